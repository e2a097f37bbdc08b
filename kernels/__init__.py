"""Triton kernels, installed as `vitsim.kernels` (one family per module).

Nothing here imports triton at package import time; each module does, and the dispatcher
imports a module only when a Triton backend is about to run.
"""
