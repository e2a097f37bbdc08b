"""`vitsim demo`: the whole analysis without a download.

Trains a small timm ViT and a small timm ResNet on the 1,797 handwritten digits that
scikit-learn ships (upsampled from 8×8 to 32×32; the ViT uses 4-pixel patches, an 8×8 grid),
then runs `vitsim compare` on the held-out digits, written to `OUT/heldout/` as PNG files so that
the run goes through the same path as any image folder. Seeded; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .compare import CompareConfig, digits_images, run

IMAGE_SIZE = 32
HELD_OUT = 360
VIT = ("vit_tiny_patch16_224", {"img_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 64, "depth": 6,
                                "num_heads": 4, "mlp_ratio": 2.0, "num_classes": 10})
# resnet18's 8 BasicBlocks at a quarter of the width.
RESNET = ("resnet18", {"channels": (16, 32, 64, 128), "stem_width": 16, "num_classes": 10})
# (epochs, peak learning rate, batch size) of each model: the ViT needs more steps.
TRAINING = {"vit": (20, 1.5e-3, 32), "resnet": (8, 3e-3, 64)}


def _split(seed: int):
    """Seeded train / held-out split of the digits at IMAGE_SIZE: uint8 images and labels."""
    images, labels = digits_images(IMAGE_SIZE)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:HELD_OUT], order[HELD_OUT:]
    return (images[train], labels[train]), (images[test], labels[test])


def _to_input(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 `(N, S, S)` → normalised `(N, 3, S, S)` float32, exactly what the timm eval
    transform makes of the PNG files (ToTensor divides by 255, Normalize)."""
    x = torch.from_numpy(images).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    return ((x - mean) / std).contiguous()


def _shift(x: torch.Tensor, background: float, gen: torch.Generator, margin: int = 3) -> torch.Tensor:
    """Random translation of each image by up to `margin` pixels (the augmentation)."""
    padded = F.pad(x, (margin,) * 4, value=background)
    offsets = torch.randint(0, 2 * margin + 1, (len(x), 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
          y_test: torch.Tensor, *, epochs: int, lr: float, batch: int, background: float,
          seed: int, device: torch.device, name: str, log=print) -> float:
    """AdamW with a one-cycle schedule and label smoothing; returns held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    acc = float("nan")
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = _shift(x[idx], background, gen).to(device)
            loss = F.cross_entropy(model(xb), y[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, x_test, y_test, device)
        log(f"  {name} epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out accuracy "
            f"{acc:.3f} ({time.perf_counter() - started:.1f} s)")
    model.eval()
    return acc


@torch.no_grad()
def accuracy(model, x, y, device) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def _write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels)):
        sub = folder / str(int(label))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(sub / f"{i:04d}.png")


def run_demo(out: str = "vitsim-demo", *, epochs: int | None = None, seed: int = 0,
             device: str | None = None, progress: bool = True, train_limit: int | None = None,
             log=print) -> dict:
    """Train the two demo models, compare them on the held-out digits, write the report to `out`.

    Args:
        out: output folder (report, figures, checkpoints/, heldout/).
        epochs: training epochs of both models (default: the demo's per-model settings).
        seed: seed of the split, initialisation, augmentation and batch order.
        device: "cpu" or "cuda" (default: CUDA when available).
        progress: progress bar during the comparison.
        train_limit: train on only this many images (quick smoke runs).
    Returns:
        The results dict of `vitsim.compare.run`.
    """
    out_dir = Path(out)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    (train_img, train_lab), (test_img, test_lab) = _split(seed)
    if train_limit is not None:
        train_img, train_lab = train_img[:train_limit], train_lab[:train_limit]
    # One grey level for all three channels, as ToTensor + Normalize sees the RGB PNGs.
    mean = float(train_img.mean() / 255.0)
    std = float(train_img.std() / 255.0)
    data_config = {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "interpolation": "bilinear",
                   "mean": (mean,) * 3, "std": (std,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    x, y = _to_input(train_img, mean, std), torch.from_numpy(train_lab)
    x_test, y_test = _to_input(test_img, mean, std), torch.from_numpy(test_lab)
    background = -mean / std

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # These models are too small for intra-op threads to pay off on a CPU: one thread trains as
    # fast as two, and does not stall when other processes share the cores.
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        paths = _train_both(x, y, x_test, y_test, epochs, seed, dev, background, data_config,
                            ckpt_dir, log)
    finally:
        torch.set_num_threads(threads)

    heldout = out_dir / "heldout"
    # Rewritten every run: another seed holds out other digits.
    shutil.rmtree(heldout, ignore_errors=True)
    _write_pngs(test_img, test_lab, heldout)
    log(f"comparing on {len(test_img)} held-out digits")
    cfg = CompareConfig(
        model_a=VIT[0], model_b=RESNET[0], images=str(heldout), num_images=None, batch_size=120,
        checkpoint_a=str(paths["vit"]), checkpoint_b=str(paths["resnet"]), device=str(dev),
        granularity="fine", out=str(out_dir), workers=0, progress=progress)
    return run(cfg)


def _train_both(x, y, x_test, y_test, epochs, seed, dev, background, data_config, ckpt_dir,
                log) -> dict:
    """Train the demo ViT and ResNet; save their checkpoints; returns `{key: path}`."""
    import timm

    paths = {}
    for key, (name, kwargs) in (("vit", VIT), ("resnet", RESNET)):
        n_epochs, lr, batch = TRAINING[key]
        n_epochs = epochs if epochs is not None else n_epochs
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
        log(f"training {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) "
            f"on {len(x)} digits for {n_epochs} epochs")
        started = time.perf_counter()
        acc = train(model, x, y, x_test, y_test, epochs=n_epochs, lr=lr, batch=batch,
                    background=background, seed=seed, device=dev, name=key, log=log)
        meta = {"model": name, "model_kwargs": kwargs, "data_config": data_config,
                "training": {"dataset": "scikit-learn digits", "train_images": len(x),
                             "heldout_images": len(x_test), "epochs": n_epochs, "seed": seed,
                             "heldout_accuracy": acc,
                             "seconds": round(time.perf_counter() - started, 1)}}
        paths[key] = ckpt_dir / f"{key}.pth"
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save({"vitsim": meta, "state_dict": state}, paths[key])
    return paths
