"""Forward hooks on timm models: layer activations, attention queries/keys, residual norms.

`Capture` is a context manager. On entry it registers forward hooks on a timm model, on exit
it removes every one of them. During each forward pass it records

- `activations`: the representations the CKA heatmaps compare, one `(B, ...)` tensor per layer
  in forward order with stable names (`"blocks.3"`, `"layer2.1"`, ...);
- `qk`: queries and keys `(B, H, N, D)` of every attention layer, taken where timm's attention
  computes them (the outputs of `q_norm`/`k_norm`, which are `nn.Identity` unless the model uses
  QK normalisation), so the attention matrix is never formed;
- `norms`: per-token (ViT) or per-example (ResNet) L2 norms of `z` and `f(z)` of every residual
  sub-block `z ↦ z + f(z)` (conventions §6), taken right before the add.

Supported models (`describe` decides):

- ViT-style: timm `VisionTransformer` and subclasses (`vit_*`, `deit_*` including distilled
  DeiT with 2 prefix tokens, `vit_*_reg4_*` with registers) built from the standard pre-norm
  `Block` and `Attention`;
- ResNet-style: timm `ResNet` (`resnet*`, BasicBlock/Bottleneck) and `ResNetV2`
  (`resnetv2_*`, pre-activation and plain bottlenecks).

Any other model needs `layers=`, a regular expression matched (in full) against
`model.named_modules()` names; only activations are captured then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .norms import norms

GRANULARITIES = ("blocks", "fine")

SUPPORTED = (
    "timm VisionTransformer models (vit_*, deit_* incl. distilled, vit_*_reg4_* with registers) "
    "and timm ResNet/ResNetV2 models (resnet*, resnetv2_*)"
)


class UnsupportedModelError(ValueError):
    """The model is neither ViT- nor ResNet-style and no `layers=` pattern was given."""


@dataclass(frozen=True)
class ModelSpec:
    """What `Capture` records for one model.

    Attributes:
        kind: "vit", "resnet" or "custom" (a `layers=` pattern on an unsupported model).
        layers: activation names in forward order (the CKA heatmap axes).
        attention: names of the attention modules (keys of `Capture.qk`), in forward order.
        residuals: names of the residual sub-blocks (keys of `Capture.norms`): for a ViT
            `"blocks.i.attn"` and `"blocks.i.mlp"`, for a ResNet the block name.
        blocks: names of the transformer/residual blocks.
        num_heads: heads of each attention module.
        scales: softmax scale of each attention module (`head_dim ** -0.5` in timm).
        patch_size: pixels per patch side (ViT), else None.
        grid: `(gh, gw)` patch grid at the model's configured image size (ViT), else None.
        num_prefix_tokens: class/distillation/register tokens before the patches (ViT), else 0.
        class_token: whether token 0 is a class token.
        dynamic_grid: the grid follows the input size (timm `dynamic_img_size`).
    """

    kind: str
    layers: tuple[str, ...]
    attention: tuple[str, ...] = ()
    residuals: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    num_heads: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    patch_size: int | None = None
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0
    class_token: bool = False
    dynamic_grid: bool = False
    # (module name, role, key) triples the hooks are built from; not part of the public record.
    _points: tuple = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict:
        """JSON-friendly summary (no private fields)."""
        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "attention": list(self.attention),
            "residuals": list(self.residuals),
            "blocks": list(self.blocks),
            "num_heads": list(self.num_heads),
            "patch_size": self.patch_size,
            "grid": list(self.grid) if self.grid else None,
            "num_prefix_tokens": self.num_prefix_tokens,
            "class_token": self.class_token,
        }


# --- model inspection ---------------------------------------------------------------------


def _timm_classes():
    from timm.layers import Attention
    from timm.models import resnet, resnetv2
    from timm.models.vision_transformer import Block, VisionTransformer

    return {
        "VisionTransformer": VisionTransformer,
        "Block": Block,
        "Attention": Attention,
        "ResNet": resnet.ResNet,
        "BasicBlock": resnet.BasicBlock,
        "Bottleneck": resnet.Bottleneck,
        "ResNetV2": resnetv2.ResNetV2,
        "PreActBasic": resnetv2.PreActBasic,
        "PreActBottleneck": resnetv2.PreActBottleneck,
        "BottleneckV2": resnetv2.Bottleneck,
    }


def _is_vit(model: nn.Module, c: dict) -> bool:
    if not isinstance(model, c["VisionTransformer"]):
        return False
    return all(isinstance(b, c["Block"]) and isinstance(b.attn, c["Attention"]) for b in model.blocks)


def _resnet_blocks(model: nn.Module, c: dict) -> list[tuple[str, nn.Module]] | None:
    """`[(name, block)]` of a supported ResNet in forward order, or None."""
    if isinstance(model, c["ResNet"]):
        types = (c["BasicBlock"], c["Bottleneck"])
        stages = [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
    elif isinstance(model, c["ResNetV2"]):
        types = (c["PreActBasic"], c["PreActBottleneck"], c["BottleneckV2"])
        stages = [(f"stages.{i}.blocks", s.blocks) for i, s in enumerate(model.stages)]
    else:
        return None
    blocks = [(f"{prefix}.{j}", b) for prefix, stage in stages for j, b in enumerate(stage)]
    if not blocks or not all(isinstance(b, types) for _, b in blocks):
        return None
    return blocks


def _resnet_parts(block: nn.Module, c: dict) -> tuple[list[str], str]:
    """Inner activations (fine granularity) and the last module of the residual branch."""
    if isinstance(block, c["BasicBlock"]):
        inner, last = ["act1"], "bn2"
    elif isinstance(block, c["Bottleneck"]):
        inner, last = ["act1", "act2"], "bn3"
    elif isinstance(block, c["PreActBasic"]):
        inner, last = ["norm1", "norm2"], "drop_path"
    elif isinstance(block, c["PreActBottleneck"]):
        inner, last = ["norm1", "norm2", "norm3"], "drop_path"
    else:
        inner, last = ["norm1", "norm2"], "drop_path"
    # The branch ends with drop_path when present, else squeeze-excitation, else the last norm.
    for candidate in ("drop_path", "se"):
        if getattr(block, candidate, None) is not None:
            last = candidate
            break
    return inner, last


def _square(name: str, value) -> int:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if pair[0] != pair[1]:
        raise UnsupportedModelError(f"{name} {pair} is not square; attention distance needs square patches")
    return int(pair[0])


def _vit_spec(model: nn.Module, granularity: str) -> ModelSpec:
    layers, attention, residuals, blocks, points = [], [], [], [], []
    for i, blk in enumerate(model.blocks):
        b = f"blocks.{i}"
        blocks.append(b)
        if granularity == "fine":
            hidden = "mlp.act" if hasattr(blk.mlp, "act") else "mlp.fc1"
            fine = [
                (f"{b}.norm1", "norm1", "out"),
                (f"{b}.attn", "attn", "out"),
                # The residual stream after the attention add is what norm2 receives.
                (f"{b}.attn_residual", "norm2", "in"),
                (f"{b}.norm2", "norm2", "out"),
                (f"{b}.{hidden}", hidden, "out"),
            ]
            for name, module, where in fine:
                layers.append(name)
                points.append(("act", name, f"{b}.{module}", where))
        layers.append(b)
        points.append(("act", b, b, "out"))
        attention.append(f"{b}.attn")
        points.append(("q", f"{b}.attn", f"{b}.attn.q_norm", "out"))
        points.append(("k", f"{b}.attn", f"{b}.attn.k_norm", "out"))
        # Sub-block attn: z = block input, f(z) = drop_path1(ls1(attn(norm1(z)))).
        # Sub-block mlp: z = stream after the attention add (norm2's input), f(z) = drop_path2 out.
        residuals += [f"{b}.attn", f"{b}.mlp"]
        points += [
            ("z", f"{b}.attn", b, "in"),
            ("fz", f"{b}.attn", f"{b}.drop_path1", "out"),
            ("z", f"{b}.mlp", f"{b}.norm2", "in"),
            ("fz", f"{b}.mlp", f"{b}.drop_path2", "out"),
        ]
    pe = model.patch_embed
    patch = _square("patch size", pe.patch_size)
    grid = tuple(int(g) for g in pe.grid_size) if getattr(pe, "grid_size", None) is not None else None
    heads = tuple(int(blk.attn.num_heads) for blk in model.blocks)
    scales = tuple(float(blk.attn.scale) for blk in model.blocks)
    return ModelSpec(
        kind="vit", layers=tuple(layers), attention=tuple(attention), residuals=tuple(residuals),
        blocks=tuple(blocks), num_heads=heads, scales=scales, patch_size=patch, grid=grid,
        num_prefix_tokens=int(model.num_prefix_tokens), class_token=model.cls_token is not None,
        dynamic_grid=bool(getattr(model, "dynamic_img_size", False)), _points=tuple(points),
    )


def _resnet_spec(blocks: list[tuple[str, nn.Module]], granularity: str, c: dict) -> ModelSpec:
    layers, points = [], []
    for b, blk in blocks:
        inner, last = _resnet_parts(blk, c)
        if granularity == "fine":
            for part in inner:
                layers.append(f"{b}.{part}")
                points.append(("act", f"{b}.{part}", f"{b}.{part}", "out"))
        layers.append(b)
        points.append(("act", b, b, "out"))
        # z is the shortcut: the projection's output where the block has one, else its input.
        if getattr(blk, "downsample", None) is not None:
            points.append(("z", b, f"{b}.downsample", "out"))
        else:
            points.append(("z", b, b, "in"))
        points.append(("fz", b, f"{b}.{last}", "out"))
    names = tuple(b for b, _ in blocks)
    return ModelSpec(kind="resnet", layers=tuple(layers), residuals=names, blocks=names,
                     _points=tuple(points))


def _module_examples(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 2]
    more = ", ..." if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe(model: nn.Module, granularity: str = "blocks", layers: str | None = None) -> ModelSpec:
    """Inspect a timm model: which layers `Capture` records and the geometry of its tokens.

    Args:
        model: a timm model (see the module docstring for the supported families).
        granularity: "blocks" (every transformer/residual block output) or "fine" (also the
            representations inside each block, as in the paper's heatmaps).
        layers: optional regular expression; when given, the activations are the modules whose
            full `named_modules()` name matches it, in registration order. Required for models
            that are not ViT- or ResNet-style.
    Returns:
        A `ModelSpec`.
    Raises:
        ValueError: unknown granularity, invalid pattern, or a pattern that matches nothing.
        UnsupportedModelError: an unsupported model without `layers`.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: 'blocks', 'fine'")
    c = _timm_classes()
    if _is_vit(model, c):
        spec = _vit_spec(model, granularity)
    elif (blocks := _resnet_blocks(model, c)) is not None:
        spec = _resnet_spec(blocks, granularity, c)
    elif layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported for capture; supported: {SUPPORTED}. "
            f"For another model pass a layer pattern (layers=/--layers), a regular expression "
            f"matched against module names such as: {_module_examples(model)}"
        )
    else:
        spec = ModelSpec(kind="custom", layers=())
    if layers is None:
        return spec
    try:
        regex = re.compile(layers)
    except re.error as exc:
        raise ValueError(f"layers pattern {layers!r} is not a valid regular expression: {exc}") from None
    names = [n for n, _ in model.named_modules() if n and regex.fullmatch(n)]
    if not names:
        raise ValueError(
            f"layers pattern {layers!r} matches no module of {type(model).__name__}; "
            f"module names look like: {_module_examples(model)}"
        )
    points = tuple(p for p in spec._points if p[0] != "act")
    points += tuple(("act", n, n, "out") for n in names)
    return ModelSpec(**{**spec.__dict__, "layers": tuple(names), "_points": points})


# --- hooks --------------------------------------------------------------------------------


def _first_tensor(value, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"module {where} returned {type(value).__name__}, not a tensor; it cannot be captured")


class Capture:
    """Context manager recording activations, queries/keys and residual norms of a timm model.

    Example:
        >>> with vitsim.Capture(model, granularity="fine") as cap:
        ...     model(images)                       # (B, 3, H, W)
        ...     acts = cap.activations             # {"blocks.0.norm1": (B, N, C), ...}
        ...     q, k = cap.qk["blocks.0.attn"]     # (B, H, N, D) each
        ...     z_norm, fz_norm = cap.norms["blocks.0.attn"]   # (B, N) float32 each

    Args:
        model: a timm model (see `describe`).
        granularity: "blocks" or "fine" (see `describe`).
        layers: optional regular expression selecting the activation modules by name.
        attention: record q/k of the attention layers (ViT). Default True.
        residuals: record the norms of z and f(z) of every residual sub-block. Default True.
        keep_residuals: also keep clones of the z and f(z) tensors in `residuals`. Default False.
        on_qk: optional `callback(name, q, k)`, called as soon as an attention layer has computed
            its keys; q and k are then not stored (keeps memory at one layer's q/k).

    Attributes (filled during each forward pass, emptied by `clear()` and on exit):
        spec: the `ModelSpec`.
        activations: `{layer name: (B, ...) tensor}`, detached clones in the model's dtype.
        qk: `{attention name: (q, k)}`.
        norms: `{sub-block name: (‖z‖, ‖f(z)‖)}`, `(B, N)` (ViT) or `(B,)` (ResNet), float32
            (float64 for float64 models).
        residuals: `{sub-block name: (z, f(z))}` when `keep_residuals`.
        input_size: `(H, W)` of the last input batch.
    """

    def __init__(self, model: nn.Module, *, granularity: str = "blocks", layers: str | None = None,
                 attention: bool = True, residuals: bool = True, keep_residuals: bool = False,
                 on_qk: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None):
        self.model = model
        self.spec = describe(model, granularity, layers)
        self.attention = attention
        self.residuals_enabled = residuals
        self.keep_residuals = keep_residuals
        self.on_qk = on_qk
        self.activations: dict[str, torch.Tensor] = {}
        self.qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.residuals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.input_size: tuple[int, int] | None = None
        self._pending_q: dict[str, torch.Tensor] = {}
        self._pending_res: dict[str, dict] = {}
        self._handles: list = []

    # -- lifecycle --

    def __enter__(self) -> "Capture":
        if self._handles:
            raise RuntimeError("this Capture is already active")
        modules = dict(self.model.named_modules())
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._record_input))
            for role, key, module_name, where in self.spec._points:
                if role in ("q", "k") and not self.attention:
                    continue
                if role in ("z", "fz") and not self.residuals_enabled:
                    continue
                module = modules[module_name]
                hook = self._make_hook(role, key, module_name, where)
                if where == "in":
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        self.clear()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop everything recorded so far (call between batches when reusing one capture)."""
        self.activations = {}
        self.qk = {}
        self.norms = {}
        self.residuals = {}
        self._pending_q.clear()
        self._pending_res.clear()

    # -- results --

    @property
    def grid(self) -> tuple[int, int] | None:
        """Patch grid of the last input (ViT), following the input size for dynamic models."""
        if self.spec.kind != "vit":
            return None
        if self.spec.dynamic_grid and self.input_size is not None:
            return tuple(self.model.patch_embed.dynamic_feat_size(self.input_size))
        return self.spec.grid

    def layer_outputs(self) -> list[torch.Tensor]:
        """Activations as a list in `spec.layers` order; raises if a layer did not run."""
        missing = [n for n in self.spec.layers if n not in self.activations]
        if missing:
            raise RuntimeError(f"no activation recorded for layers {missing[:5]}; did the forward pass run?")
        return [self.activations[n] for n in self.spec.layers]

    # -- hooks --

    def _record_input(self, module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self.input_size = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    def _make_hook(self, role: str, key: str, module_name: str, where: str):
        if where == "in":
            def pre_hook(module, args, kwargs):
                value = args[0] if args else next(iter(kwargs.values()))
                self._receive(role, key, _first_tensor(value, module_name))
            return pre_hook

        def hook(module, args, output):
            self._receive(role, key, _first_tensor(output, module_name))
        return hook

    def _receive(self, role: str, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if role == "act":
            # A clone: some ResNet blocks later modify their tensors in place (`x += shortcut`).
            self.activations[key] = t.clone()
        elif role == "q":
            self._pending_q[key] = t
        elif role == "k":
            q = self._pending_q.pop(key)
            if self.on_qk is not None:
                self.on_qk(key, q, t)
            else:
                self.qk[key] = (q, t)
        else:
            # z or f(z); in a ResNet block the shortcut projection runs after the branch, so
            # either may come first. Norms now: the add may modify the tensor in place.
            pending = self._pending_res.setdefault(key, {})
            pending[role] = (norms(t, "tokens" if self.spec.kind == "vit" else "maps"),
                             t.clone() if self.keep_residuals else None)
            if len(pending) == 2:
                del self._pending_res[key]
                self.norms[key] = (pending["z"][0], pending["fz"][0])
                if self.keep_residuals:
                    self.residuals[key] = (pending["z"][1], pending["fz"][1])
