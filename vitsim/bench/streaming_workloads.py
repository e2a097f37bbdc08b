"""Streaming-suite workloads (issue 5): the cost of `MinibatchCKA.update` beside the forward
passes that produce its inputs.

W5: ViT-L/16 (24 blocks) × ResNet-50 (16 bottleneck blocks), batch 256 at 224 px, bfloat16,
random weights. `run` is one `MinibatchCKA.update` on the 24 + 16 captured block outputs;
`baseline` is the two models' forward passes on the same batch, so the runner's ratio column
(run / baseline) is the fraction of the forward time spent on CKA. Target: ≤ 5%.
"""

from __future__ import annotations

import torch

from .. import MinibatchCKA
from .workload import Workload


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(smoke: bool):
    import timm

    # timm zero-initialises each ResNet block's last BatchNorm, which would make every block an
    # identity at random init; real-looking activations need it off.
    if smoke:
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
        cnn = timm.create_model("resnet18", pretrained=False, zero_init_last=False)
        return vit, cnn, 32
    vit = timm.create_model("vit_large_patch16_224", pretrained=False)
    cnn = timm.create_model("resnet50", pretrained=False, zero_init_last=False)
    return vit, cnn, 224


def _blocks(vit, cnn) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The residual blocks whose outputs Raghu et al. compare: ViT blocks, ResNet stage blocks."""
    cnn_blocks = [b for stage in (cnn.layer1, cnn.layer2, cnn.layer3, cnn.layer4) for b in stage]
    return list(vit.blocks), cnn_blocks


def _setup_w5(device: torch.device, smoke: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = 8 if smoke else 256
    vit, cnn, size = _models(smoke)
    vit, cnn = (m.to(device=device, dtype=dtype).eval() for m in (vit, cnn))
    vit_blocks, cnn_blocks = _blocks(vit, cnn)
    captured: dict[str, list] = {"vit": [None] * len(vit_blocks), "cnn": [None] * len(cnn_blocks)}

    def hook(kind, index):
        def save(_module, _inputs, output):
            captured[kind][index] = output
        return save

    handles = [b.register_forward_hook(hook("vit", i)) for i, b in enumerate(vit_blocks)]
    handles += [b.register_forward_hook(hook("cnn", i)) for i, b in enumerate(cnn_blocks)]
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            vit(images)
            cnn(images)

    forward()
    _sync(device)
    feats = {"vit": list(captured["vit"]), "cnn": list(captured["cnn"])}
    metric = MinibatchCKA(len(vit_blocks), len(cnn_blocks))
    n = batch
    dims = [f[0].numel() for f in feats["vit"] + feats["cnn"]]
    return {"forward": forward, "feats": feats, "metric": metric, "handles": handles,
            "gram_flops": float(sum(2 * n * n * d for d in dims)),
            "bytes": float(sum(n * d for d in dims) * torch.finfo(dtype).bits // 8),
            "device": device}


def _run_w5(inputs: dict) -> None:
    inputs["metric"].update(inputs["feats"]["vit"], inputs["feats"]["cnn"])
    _sync(inputs["device"])


def _baseline_w5(inputs: dict) -> None:
    inputs["forward"]()
    _sync(inputs["device"])


def workloads(device: torch.device, smoke: bool) -> list[Workload]:
    """The streaming suite on `device`; `smoke=True`: ViT-Ti/16 at 32 px × ResNet-18, batch 8
    (float32 on CPU), finishing in seconds.

    The flop and byte counts are only known once the models exist, so `setup` records them in
    the inputs dict (`gram_flops`, `bytes`); `flops`/`bytes` below are the full-size figures.
    """
    device = torch.device(device)
    if smoke:
        name, info = "W5 MinibatchCKA update (smoke)", {
            "vit": "vit_tiny_patch16_224 img_size=32 (12 blocks)", "cnn": "resnet18 (8 blocks)",
            "batch": 8}
        flops = bytes_ = None
    else:
        n, vit_d = 256, 197 * 1024
        cnn_d = ([256 * 56 * 56] * 3 + [512 * 28 * 28] * 4 + [1024 * 14 * 14] * 6
                 + [2048 * 7 * 7] * 3)
        dims = [vit_d] * 24 + cnn_d
        flops = float(sum(2 * n * n * d for d in dims))
        bytes_ = float(sum(n * d for d in dims) * 2)
        name, info = "W5 MinibatchCKA update", {
            "vit": "vit_large_patch16_224 (24 blocks)", "cnn": "resnet50 (16 blocks)",
            "batch": 256, "dtype": "bfloat16", "weights": "random"}
    info.update({"kernel": "linear", "unbiased": True,
                 "ratio": "update time / (ViT + ResNet forward time) on the same batch"})
    return [Workload(
        name=name,
        suite="streaming",
        setup=lambda dev: _setup_w5(torch.device(dev), smoke),
        run=_run_w5,
        baseline=_baseline_w5,
        reference=None,
        flops=flops,
        bytes=bytes_,
        ceiling="matmul_bf16",
        target="update ≤ 5% of the two forward passes (ratio ≤ 0.05)",
        info=info,
    )]
