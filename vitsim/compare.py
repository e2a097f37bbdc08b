"""`vitsim compare`: the Raghu et al. (2021) analyses of two timm models on a folder of images.

Pipeline, one minibatch at a time: images → each model's own timm eval transforms → forward pass
under `Capture` → one `MinibatchCKA` over the layers of both models (its blocks are the A×A,
A×B and B×B heatmaps), attention distance from the hooked queries and keys, ratio of norms from
the hooked residual norms. Every minibatch is fed to the accumulators and dropped, so memory does
not grow with the number of images. The accumulator state is saved to `state.pt` after every
minibatch and on Ctrl-C or a crash; `resume=True` continues from it to the same numbers an
uninterrupted run gives (the image order and the batches are deterministic).

Programmatic use:

    >>> from vitsim.compare import CompareConfig, run
    >>> results = run(CompareConfig("vit_base_patch16_224", "resnet50", images="val/",
    ...                             pretrained=True, out="report/"))
    >>> results["cka"]["a_b"]                      # La × Lb nested lists

Errors a user can fix (unknown model, empty folder, missing checkpoint, ...) raise
`CompareError` with a message meant for the terminal.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import platform
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import Capture, UnsupportedModelError
from .norms import RatioOfNorms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_FILE = "state.pt"
STATE_FORMAT = 1
# The paper's protocol (Raghu et al. 2021, after Nguyen et al. 2021): minibatch CKA with the
# unbiased estimator over 10,240 images in batches of 1,024. A CPU gets smaller batches.
PAPER_NUM_IMAGES = 10240
PAPER_BATCH_SIZE = 1024
CPU_BATCH_SIZE = 256


class CompareError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback."""


@dataclass
class CompareConfig:
    """Settings of one comparison (the CLI flags of `vitsim compare`).

    Attributes:
        model_a, model_b: timm model names.
        images: folder searched recursively for jpg/jpeg/png/webp files; None uses the 1,797
            handwritten digits that scikit-learn ships (no download).
        num_images: use at most this many readable images (None: all).
        batch_size: minibatch size of minibatch CKA (None: 1,024 on CUDA, 256 on CPU).
        pretrained: load timm's pretrained weights (needs network access).
        checkpoint_a, checkpoint_b: state-dict files to load instead.
        device: "cpu", "cuda" or "cuda:N" (None: CUDA when available).
        dtype: "float32", "bfloat16" or "float16" for the forward passes.
        unbiased: unbiased HSIC estimator (minibatch CKA needs >= 4 images per batch).
        granularity: "blocks" or "fine" (see `vitsim.capture.describe`).
        layers: regular expression selecting activation modules by name (both models).
        out: output folder.
        resume: continue from `out/state.pt`.
        workers: DataLoader worker processes decoding images.
        seed: seed of the image order and of random initialisations (model B uses seed + 1).
        img_size: build models that take an `img_size` argument (ViTs) for this input size.
        model_kwargs_a, model_kwargs_b: extra `timm.create_model` arguments (e.g. img_size).
        data_config_a, data_config_b: overrides of timm's resolved data config.
        progress: show a tqdm progress bar.
    """

    model_a: str
    model_b: str
    images: str | None = None
    num_images: int | None = PAPER_NUM_IMAGES
    batch_size: int | None = None
    pretrained: bool = False
    checkpoint_a: str | None = None
    checkpoint_b: str | None = None
    device: str | None = None
    dtype: str = "float32"
    unbiased: bool = True
    granularity: str = "blocks"
    layers: str | None = None
    out: str = "vitsim-report"
    resume: bool = False
    workers: int = 0
    seed: int = 0
    img_size: int | None = None
    model_kwargs_a: dict = field(default_factory=dict)
    model_kwargs_b: dict = field(default_factory=dict)
    data_config_a: dict | None = None
    data_config_b: dict | None = None
    progress: bool = True


# --- images -------------------------------------------------------------------------------


def find_images(root: str | os.PathLike) -> list[str]:
    """Relative paths of the image files under `root` (recursive), sorted."""
    root = Path(root)
    if not root.exists():
        raise CompareError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise CompareError(f"--images must be a folder, got the file {str(root)!r}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    found.sort()
    if not found:
        raise CompareError(
            f"no images in {str(root)!r}: expected .jpg, .jpeg, .png or .webp files "
            "(searched recursively)"
        )
    return found


def digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as `(N, size, size)` uint8 images and labels.

    The 8×8 images (values 0..16) are upsampled bilinearly; white digits on black.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return x, digits.target.astype(np.int64)


class ImageSource:
    """An ordered list of images: files of a folder, or the scikit-learn digits.

    The order is a seeded permutation (folders are often sorted by class), identical across
    runs, so resumed runs see the same minibatches.
    """

    def __init__(self, images: str | None, seed: int):
        if images is None:
            self.root = None
            self.pixels, _ = digits_images(64)
            names = [f"digit-{i:04d}" for i in range(len(self.pixels))]
            self.id = "sklearn-digits"
        else:
            self.root = Path(images).resolve()
            names = find_images(self.root)
            self.id = str(self.root)
        order = list(range(len(names)))
        random.Random(seed).shuffle(order)
        self.names = [names[i] for i in order]
        digest = hashlib.sha256("\n".join(self.names).encode()).hexdigest()
        self.fingerprint = {"source": self.id, "files": len(self.names), "sha256": digest}
        self._order = order

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int):
        """The image at `index` as an RGB PIL image; raises on an unreadable file."""
        from PIL import Image

        if self.root is None:
            return Image.fromarray(self.pixels[self._order[index]]).convert("RGB")
        with Image.open(self.root / self.names[index]) as img:
            return img.convert("RGB")


class _Dataset(torch.utils.data.Dataset):
    """Image `start + i` through every distinct transform; None where the file is unreadable."""

    def __init__(self, source: ImageSource, transforms: list, start: int):
        self.source, self.transforms, self.start = source, transforms, start

    def __len__(self) -> int:
        return len(self.source) - self.start

    def __getitem__(self, i: int):
        index = self.start + i
        try:
            img = self.source.load(index)
        except Exception:
            return index, None
        return index, [t(img) for t in self.transforms]


def _collate(items):
    return items


# --- models -------------------------------------------------------------------------------


def _timm():
    try:
        import timm
    except ImportError:
        raise CompareError("vitsim compare needs timm: pip install 'vitsim[timm]'") from None
    return timm


def check_model_name(name: str) -> None:
    """`CompareError` suggesting close names when timm does not know `name`."""
    timm = _timm()
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
    raise CompareError(f"unknown timm model {name!r}{hint}")


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    """`(state_dict, vitsim metadata)` from a checkpoint file."""
    if not Path(path).is_file():
        raise CompareError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompareError(f"cannot read checkpoint {path!r}: {exc}") from None
    meta = {}
    if isinstance(obj, dict):
        meta = obj.get("vitsim", {}) if isinstance(obj.get("vitsim"), dict) else {}
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompareError(f"checkpoint {path!r} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, meta


def _classifier_classes(model, state: dict) -> int | None:
    """Number of classes of the checkpoint's classifier, when it differs from the model's."""
    heads = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = [heads] if isinstance(heads, str) else list(heads or [])
    for head in heads:
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.shape[0] != model.num_classes:
            return int(weight.shape[0])
    return None


def _create(timm, name: str, pretrained: bool, kwargs: dict, img_size: int | None):
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs, img_size=img_size), True
        except TypeError as exc:
            # ResNets and other CNNs take any input size and have no img_size argument.
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs), False


def load_model(name: str, *, pretrained: bool, checkpoint: str | None, kwargs: dict,
               device: torch.device, dtype: torch.dtype, img_size: int | None = None,
               seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Create a timm model in eval mode, with weights; returns `(model, checkpoint metadata)`.

    Weights that are neither pretrained nor loaded are a seeded random initialisation, so a
    resumed run and a rerun see the same model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_model(name, pretrained, checkpoint, kwargs, device, dtype, img_size)


def _load_model(name, pretrained, checkpoint, kwargs, device, dtype, img_size):
    timm = _timm()
    check_model_name(name)
    state, meta = _read_checkpoint(checkpoint) if checkpoint else (None, {})
    if meta.get("model") not in (None, name):
        raise CompareError(f"checkpoint {checkpoint!r} is for model {meta['model']!r}, not {name!r}")
    kwargs = {**meta.get("model_kwargs", {}), **kwargs}
    try:
        model, used = _create(timm, name, pretrained, kwargs, img_size)
        if used:
            kwargs = {**kwargs, "img_size": img_size}
        if state is not None:
            classes = _classifier_classes(model, state)
            if classes is not None:
                kwargs = {**kwargs, "num_classes": classes}
                model = timm.create_model(name, pretrained=False, **kwargs)
    except CompareError:
        raise
    except Exception as exc:
        what = "download or load pretrained weights for" if pretrained else "create"
        raise CompareError(f"cannot {what} model {name!r}: {type(exc).__name__}: {exc}") from None
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CompareError(
                f"checkpoint {checkpoint!r} does not match model {name!r}: missing keys "
                f"{list(missing)[:5]}, unexpected keys {list(unexpected)[:5]}"
            )
    model.eval().to(device=device, dtype=dtype)
    return model, {**meta, "model_kwargs": kwargs}


def data_config(model, override: dict | None) -> dict:
    """timm's eval data config for `model`, at the input size the model was built for."""
    timm = _timm()
    cfg = dict(timm.data.resolve_data_config({}, model=model))
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    # A ViT built with a non-default img_size keeps its pretrained config's 224: use its own size.
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        cfg["input_size"] = (cfg["input_size"][0], int(img_size[0]), int(img_size[1]))
    cfg.update(override or {})
    cfg["input_size"] = tuple(cfg["input_size"])
    for key in ("mean", "std"):
        cfg[key] = tuple(float(v) for v in cfg[key])
    return cfg


def make_transform(cfg: dict):
    """timm's eval transform for a data config."""
    timm = _timm()
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return timm.data.create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False)


# --- accumulators -------------------------------------------------------------------------


def _minibatch_cka(num_layers: int, unbiased: bool):
    from .streaming import MinibatchCKA

    return MinibatchCKA(num_layers, kernel="linear", unbiased=unbiased)


class AttentionDistanceMean:
    """Streaming per-head mean attention distance of every attention layer of one model.

    State: `sums` `(L, H)` float64 (Σ over batches of batch size × the batch's per-head mean)
    and the number of images `count`; the mean over all images is `sums / count`.
    """

    def __init__(self, spec):
        self.spec = spec
        heads = max(spec.num_heads, default=0)
        self.sums = torch.zeros(len(spec.attention), heads, dtype=torch.float64)
        self.count = 0
        self._index = {name: i for i, name in enumerate(spec.attention)}
        self.grid = spec.grid

    def add(self, name: str, q: torch.Tensor, k: torch.Tensor) -> None:
        from .attention import attention_distance_qk

        i = self._index[name]
        per_head = attention_distance_qk(
            q, k, scale=self.spec.scales[i], patch_size=self.spec.patch_size, grid=self.grid,
            num_prefix_tokens=self.spec.num_prefix_tokens, reduction="mean")
        if self.sums.device != per_head.device:
            self.sums = self.sums.to(per_head.device)
        self.sums[i, : per_head.shape[0]] += per_head * q.shape[0]

    def compute(self) -> np.ndarray:
        if not self.count:
            return np.full(tuple(self.sums.shape), np.nan)
        return (self.sums.cpu() / self.count).numpy()

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu().clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].clone()
        self.count = int(state["count"])


class ModelAccumulators:
    """Attention distance and ratio-of-norms accumulators of one model."""

    def __init__(self, spec):
        self.spec = spec
        self.attention = AttentionDistanceMean(spec) if spec.attention else None
        kind = "tokens" if spec.kind == "vit" else "maps"
        self.ratios = {
            name: RatioOfNorms(kind, num_prefix_tokens=spec.num_prefix_tokens if kind == "tokens" else 1,
                               class_token=spec.class_token)
            for name in spec.residuals
        }

    def state_dict(self) -> dict:
        return {"attention": self.attention.state_dict() if self.attention else None,
                "ratios": {k: v.state_dict() for k, v in self.ratios.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.attention:
            self.attention.load_state_dict(state["attention"])
        for k, v in self.ratios.items():
            v.load_state_dict(state["ratios"][k])


# --- the run ------------------------------------------------------------------------------


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CompareError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompareError("--device cuda was asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CompareError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N")
    return dev


def _check_config(cfg: CompareConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise CompareError(f"unknown dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.granularity not in ("blocks", "fine"):
        raise CompareError(f"unknown granularity {cfg.granularity!r}; valid: blocks, fine")
    if cfg.pretrained and (cfg.checkpoint_a or cfg.checkpoint_b):
        raise CompareError("use either --pretrained or --checkpoint-a/--checkpoint-b, not both")
    need = 4 if cfg.unbiased else 2
    if cfg.batch_size is not None and cfg.batch_size < need:
        est = "unbiased" if cfg.unbiased else "biased"
        raise CompareError(
            f"--batch-size must be >= {need} for the {est} estimator, got {cfg.batch_size}")
    if cfg.num_images is not None and cfg.num_images < need:
        raise CompareError(f"--num-images must be >= {need}, got {cfg.num_images}")
    for path in (cfg.checkpoint_a, cfg.checkpoint_b):
        if path and not Path(path).is_file():
            raise CompareError(f"checkpoint {path!r} does not exist")


def _file_info(path: str | None):
    if not path:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size}


def package_versions() -> dict:
    """Versions of the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("vitsim", "torch", "timm", "numpy", "triton", "torchvision", "pillow", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Comparison:
    """All accumulators of one comparison, fed one minibatch at a time.

    Args:
        spec_a, spec_b: the two models' `ModelSpec`s.
        unbiased: HSIC estimator of the minibatch CKA.
    """

    def __init__(self, spec_a, spec_b, unbiased: bool):
        self.spec_a, self.spec_b = spec_a, spec_b
        self.num_a, self.num_b = len(spec_a.layers), len(spec_b.layers)
        # One accumulator over the layers of both models: each Gram matrix is formed once, and
        # its (A, A), (A, B) and (B, B) blocks are the three heatmaps.
        self.cka = _minibatch_cka(self.num_a + self.num_b, unbiased)
        self.a = ModelAccumulators(spec_a)
        self.b = ModelAccumulators(spec_b)

    def update(self, acts_a: list, acts_b: list, norms_a: dict, norms_b: dict, batch: int) -> None:
        """Feed one minibatch: activations in layer order and the captured residual norms."""
        self.cka.update(list(acts_a) + list(acts_b))
        for acc, norms in ((self.a, norms_a), (self.b, norms_b)):
            for name, (z, fz) in norms.items():
                acc.ratios[name].update_norms(z, fz)
            if acc.attention is not None:
                acc.attention.count += batch

    def state_dict(self) -> dict:
        return {"cka": self.cka.state_dict(), "a": self.a.state_dict(), "b": self.b.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cka.load_state_dict(state["cka"])
        self.a.load_state_dict(state["a"])
        self.b.load_state_dict(state["b"])

    def cka_blocks(self) -> dict[str, np.ndarray]:
        full = self.cka.compute()
        full = full.cpu().numpy() if isinstance(full, torch.Tensor) else np.asarray(full)
        na = self.num_a
        return {"a_b": full[:na, na:], "a_a": full[:na, :na], "b_b": full[na:, na:]}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fingerprint(cfg: CompareConfig, source: ImageSource, batch_size: int, device: torch.device,
                 kwargs_a: dict, kwargs_b: dict, data_a: dict, data_b: dict) -> dict:
    return json.loads(json.dumps({
        "models": [cfg.model_a, cfg.model_b], "model_kwargs": [kwargs_a, kwargs_b],
        "pretrained": cfg.pretrained,
        "checkpoints": [_file_info(cfg.checkpoint_a), _file_info(cfg.checkpoint_b)],
        "images": source.fingerprint, "num_images": cfg.num_images, "batch_size": batch_size,
        "unbiased": cfg.unbiased, "granularity": cfg.granularity, "layers": cfg.layers,
        "dtype": cfg.dtype, "device": device.type, "seed": cfg.seed, "data_config": [data_a, data_b],
    }, default=str))


def _spec_for(model, cfg: CompareConfig, name: str):
    try:
        return Capture(model, granularity=cfg.granularity, layers=cfg.layers).spec
    except UnsupportedModelError as exc:
        raise CompareError(f"model {name!r}: {exc}") from None
    except ValueError as exc:
        raise CompareError(f"model {name!r}: {exc}") from None


def run(cfg: CompareConfig) -> dict:
    """Run a comparison and write the report to `cfg.out`; returns the results dict.

    Raises:
        CompareError: a problem the user can fix (message meant for the terminal).
        KeyboardInterrupt: after saving the state file (rerun with `resume=True`).
    """
    _check_config(cfg)
    device = _resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    batch_size = cfg.batch_size or (PAPER_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE)
    out = Path(cfg.out)
    try:
        source = ImageSource(cfg.images, cfg.seed)
    except ImportError as exc:
        raise CompareError(f"the default digits images need scikit-learn: {exc}") from None

    model_a, meta_a = load_model(cfg.model_a, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint_a,
                                 kwargs=cfg.model_kwargs_a, device=device, dtype=dtype,
                                 img_size=cfg.img_size, seed=cfg.seed)
    model_b, meta_b = load_model(cfg.model_b, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint_b,
                                 kwargs=cfg.model_kwargs_b, device=device, dtype=dtype,
                                 img_size=cfg.img_size, seed=cfg.seed + 1)
    size = {"input_size": (3, cfg.img_size, cfg.img_size)} if cfg.img_size else {}
    data_a = data_config(model_a, {**meta_a.get("data_config", {}), **size, **(cfg.data_config_a or {})})
    data_b = data_config(model_b, {**meta_b.get("data_config", {}), **size, **(cfg.data_config_b or {})})
    spec_a = _spec_for(model_a, cfg, cfg.model_a)
    spec_b = _spec_for(model_b, cfg, cfg.model_b)

    fingerprint = _fingerprint(cfg, source, batch_size, device, meta_a["model_kwargs"],
                               meta_b["model_kwargs"], data_a, data_b)
    comparison = Comparison(spec_a, spec_b, cfg.unbiased)
    progress = {"files_consumed": 0, "images_used": 0, "batches": [], "unreadable": [],
                "complete": False, "seconds": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    if cfg.resume:
        if state_path.is_file():
            try:
                state = torch.load(state_path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CompareError(f"cannot read the state file {state_path}: {exc}") from None
            if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
                raise CompareError(
                    f"{state_path} was written by a run with different settings, models or images; "
                    "rerun with the same arguments, or without --resume to start over"
                )
            comparison.load_state_dict(state["accumulators"])
            progress = state["progress"]
        else:
            warnings.warn(f"--resume: no state file {state_path}; starting from the beginning",
                          stacklevel=2)

    def save_state():
        _atomic_save({"format": STATE_FORMAT, "fingerprint": fingerprint, "progress": progress,
                      "accumulators": comparison.state_dict()}, state_path)

    if not progress["complete"]:
        transforms_cfg = [data_a] if data_a == data_b else [data_a, data_b]
        try:
            _stream(cfg, source, [make_transform(c) for c in transforms_cfg], model_a, model_b,
                    comparison, progress, batch_size, device, dtype, save_state)
        except torch.cuda.OutOfMemoryError:
            raise CompareError(
                f"out of GPU memory with --batch-size {batch_size} (the activations of every "
                f"captured layer of both models are held for one minibatch); use a smaller "
                f"--batch-size, --dtype bfloat16 or --granularity blocks. Progress so far is in "
                f"{state_path}: --resume continues only with the same batch size") from None
    results = _results(cfg, comparison, progress, source, batch_size, device, data_a, data_b,
                       meta_a, meta_b)
    write_report(results, comparison, out)
    return results


def _stream(cfg, source, transforms, model_a, model_b, comparison, progress, batch_size, device,
            dtype, save_state) -> None:
    """Feed minibatches from `progress["files_consumed"]` on until the images run out."""
    from tqdm.auto import tqdm

    target = len(source) if cfg.num_images is None else min(cfg.num_images, len(source))
    need = 4 if cfg.unbiased else 2
    loader = torch.utils.data.DataLoader(
        _Dataset(source, transforms, progress["files_consumed"]), batch_size=batch_size,
        num_workers=cfg.workers, collate_fn=_collate, shuffle=False, pin_memory=device.type == "cuda")
    bar = tqdm(total=target, initial=progress["images_used"], unit="img", desc="compare",
               disable=not cfg.progress, dynamic_ncols=True)
    attn_a, attn_b = comparison.a.attention, comparison.b.attention
    cap_a = Capture(model_a, granularity=cfg.granularity, layers=cfg.layers,
                    on_qk=attn_a.add if attn_a else None)
    cap_b = Capture(model_b, granularity=cfg.granularity, layers=cfg.layers,
                    on_qk=attn_b.add if attn_b else None)
    started = time.perf_counter()
    seconds0 = progress["seconds"]
    buffer: list = []

    def feed(items):
        xs = [torch.stack([item[1][t] for item in items]) for t in range(len(transforms))]
        xa = xs[0].to(device=device, dtype=dtype, non_blocking=True)
        xb = xs[-1].to(device=device, dtype=dtype, non_blocking=True) if len(xs) > 1 else xa
        with torch.inference_mode():
            for cap, acc, model, x in ((cap_a, attn_a, model_a, xa), (cap_b, attn_b, model_b, xb)):
                cap.clear()
                if acc is not None:
                    acc.grid = _grid_for(cap, x)
                model(x)
            comparison.update(cap_a.layer_outputs(), cap_b.layer_outputs(), cap_a.norms, cap_b.norms,
                              len(items))
            cap_a.clear()
            cap_b.clear()
        progress["files_consumed"] = items[-1][0] + 1
        progress["images_used"] += len(items)
        progress["batches"].append(len(items))
        progress["seconds"] = seconds0 + time.perf_counter() - started
        save_state()
        bar.update(len(items))

    try:
        with cap_a, cap_b:
            for items in loader:
                for index, tensors in items:
                    if progress["images_used"] + len(buffer) >= target:
                        break
                    if tensors is None:
                        if index not in progress["unreadable"]:
                            progress["unreadable"].append(index)
                        continue
                    buffer.append((index, tensors))
                    if len(buffer) == batch_size:
                        feed(buffer)
                        buffer = []
                if progress["images_used"] + len(buffer) >= target:
                    break
            # A last partial minibatch is used when it holds at least half a batch (or is the
            # only one): a tiny batch would add an estimate as noisy as it is heavily weighted.
            usable = 2 * len(buffer) >= batch_size or not progress["batches"]
            if buffer and len(buffer) >= need and usable:
                feed(buffer)
            elif buffer:
                progress["dropped"] = len(buffer)
                warnings.warn(f"dropped the last {len(buffer)} images: a partial minibatch is used only "
                              f"when it holds at least half a batch and >= {need} images", stacklevel=3)
            progress["complete"] = True
            # The state on disk is always that of the last completed minibatch: an interruption
            # inside a minibatch (partly fed accumulators) never reaches it.
            save_state()
    finally:
        bar.close()
    if progress["images_used"] == 0:
        raise CompareError("no readable images: every file failed to decode")
    if progress["unreadable"]:
        names = ", ".join(source.names[i] for i in sorted(progress["unreadable"])[:5])
        warnings.warn(f"skipped {len(progress['unreadable'])} unreadable image file(s): {names}"
                      + (", ..." if len(progress["unreadable"]) > 5 else ""), stacklevel=3)


def _grid_for(cap: Capture, x: torch.Tensor):
    if cap.spec.kind != "vit":
        return None
    cap.input_size = (int(x.shape[-2]), int(x.shape[-1]))
    return cap.grid


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _model_results(name, spec, acc: ModelAccumulators, meta: dict, data: dict, checkpoint) -> dict:
    attention = None
    if acc.attention is not None:
        attention = {"layers": list(spec.attention), "num_heads": list(spec.num_heads),
                     "per_head": acc.attention.compute().tolist()}
    ratios = []
    for sub, r in acc.ratios.items():
        value = r.compute()
        if isinstance(value, dict):
            block, branch = sub.rsplit(".", 1)
            ratios.append({"name": sub, "block": block, "branch": branch, **value})
        else:
            ratios.append({"name": sub, "block": sub, "branch": "residual", "ratio": value})
    return {
        "name": name, "checkpoint": checkpoint, "model_kwargs": meta.get("model_kwargs", {}),
        **spec.as_dict(), "data_config": data,
        "attention_distance": attention, "ratio_of_norms": ratios,
        **({"training": meta["training"]} if "training" in meta else {}),
    }


def _results(cfg, comparison, progress, source, batch_size, device, data_a, data_b, meta_a, meta_b):
    blocks = comparison.cka_blocks()
    settings = asdict(cfg)
    settings.update(batch_size=batch_size, device=str(device),
                    images=str(source.root) if source.root else None)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    return _nan_to_none({
        "vitsim_results": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "device_name": device_name,
        "settings": settings,
        "data": {
            "source": source.id, "images_found": len(source),
            "images_used": progress["images_used"], "unreadable": len(progress["unreadable"]),
            "dropped": progress.get("dropped", 0), "batches": progress["batches"],
            "seconds": progress["seconds"],
        },
        "models": {
            "a": _model_results(cfg.model_a, comparison.spec_a, comparison.a, meta_a, data_a,
                                cfg.checkpoint_a),
            "b": _model_results(cfg.model_b, comparison.spec_b, comparison.b, meta_b, data_b,
                                cfg.checkpoint_b),
        },
        "cka": {
            "estimator": "minibatch CKA, linear kernel, "
                         + ("unbiased" if cfg.unbiased else "biased") + " HSIC",
            **{k: v.tolist() for k, v in blocks.items()},
        },
    })


def write_report(results: dict, comparison: Comparison, out: Path) -> None:
    """results.json, results.npz, the figures and report.md in `out`."""
    from . import plots

    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    arrays: dict[str, Any] = {f"cka_{k}": np.asarray(v, dtype=np.float64)
                              for k, v in comparison.cka_blocks().items()}
    for side in ("a", "b"):
        m = results["models"][side]
        arrays[f"layers_{side}"] = np.asarray(m["layers"], dtype=str)
        acc = getattr(comparison, side)
        if acc.attention is not None:
            arrays[f"attention_distance_{side}"] = acc.attention.compute()
            arrays[f"attention_layers_{side}"] = np.asarray(m["attention_distance"]["layers"], dtype=str)
        rows = m["ratio_of_norms"]
        if rows:
            arrays[f"ratio_names_{side}"] = np.asarray([r["name"] for r in rows], dtype=str)
            for key in ("cls", "spatial", "ratio"):
                if key in rows[0]:
                    arrays[f"ratio_{key}_{side}"] = np.asarray(
                        [np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)
    np.savez(out / "results.npz", **arrays)
    figures = plots.write_figures(results, out)
    (out / "report.md").write_text(plots.report_markdown(results, figures))
