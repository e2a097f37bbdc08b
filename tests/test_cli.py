"""`vitsim compare` / `vitsim demo` end to end on tiny random-weight models and generated images."""

import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from vitsim import cli, compare  # noqa: E402

VIT = "vit_tiny_patch16_224"
# --img-size 32: a 2×2 patch grid keeps the ViT cheap; resnet18 takes 32×32 inputs as they are.
BASE = ["compare", VIT, "resnet18", "--img-size", "32", "--batch-size", "6", "--workers", "0",
        "--no-progress"]
FILES = ("cka_a_b.png", "cka_a_a.png", "cka_b_b.png", "attention_distance.png", "ratio_of_norms.png",
         "results.json", "results.npz", "report.md", "state.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """14 readable images of mixed formats and sizes in nested folders, plus one broken file."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(14):
        folder = root / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else "")
        ext = ("png", "jpg", "webp")[i % 3]
        pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.{ext}")
    (root / "a" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")
    return root


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def created_models(monkeypatch):
    """Every model the pipeline creates, to check that no hook is left behind."""
    made = []
    original = compare.load_model

    def recording(*args, **kwargs):
        model, meta = original(*args, **kwargs)
        made.append(model)
        return model, meta

    monkeypatch.setattr(compare, "load_model", recording)
    return made


def _run(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def reference_run(images, tmp_path_factory):
    """One uninterrupted unbiased run, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("full")
    code = cli.main(BASE + ["--images", str(images), "--out", str(out)])
    assert code == 0
    return out


def _load(out):
    with open(out / "results.json") as f:
        return json.load(f), dict(np.load(out / "results.npz"))


def _matrix(rows):
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def test_compare_writes_every_file_with_the_documented_schema(reference_run):
    out = reference_run
    for name in FILES:
        assert (out / name).is_file(), name
    for name in FILES[:5]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    results, arrays = _load(out)
    assert set(results) >= {"versions", "settings", "data", "models", "cka", "device_name"}
    assert {"torch", "timm", "numpy", "vitsim", "python"} <= set(results["versions"])
    settings = results["settings"]
    assert (settings["model_a"], settings["model_b"], settings["unbiased"]) == (VIT, "resnet18", True)
    assert results["data"] == {**results["data"], "images_found": 15, "images_used": 12,
                               "unreadable": 1, "batches": [6, 6], "dropped": 2}
    a, b = results["models"]["a"], results["models"]["b"]
    assert a["layers"] == [f"blocks.{i}" for i in range(12)]
    assert b["layers"] == [f"layer{s}.{j}" for s in range(1, 5) for j in range(2)]
    assert (a["num_prefix_tokens"], a["grid"], a["patch_size"]) == (1, [2, 2], 16)
    for key, (rows, cols) in {"a_b": (a, b), "a_a": (a, a), "b_b": (b, b)}.items():
        m = _matrix(results["cka"][key])
        assert m.shape == (len(rows["layers"]), len(cols["layers"]))
        assert np.all(np.isfinite(m)) and np.all(np.abs(m) <= 1 + 1e-9)
        np.testing.assert_array_equal(arrays[f"cka_{key}"], m)
    assert np.allclose(_matrix(results["cka"]["a_a"]), _matrix(results["cka"]["a_a"]).T, atol=1e-12)
    att = np.array(a["attention_distance"]["per_head"])
    assert att.shape == (12, 3) and np.all(att >= 0)
    # 2×2 grid of 16-px patches: a distance is at most the diagonal, 16·√2 pixels.
    assert np.all(att <= 16 * math.sqrt(2) + 1e-9)
    np.testing.assert_array_equal(arrays["attention_distance_a"], att)
    assert b["attention_distance"] is None
    assert [r["name"] for r in a["ratio_of_norms"]][:2] == ["blocks.0.attn", "blocks.0.mlp"]
    assert all(r["cls"] > 0 and r["spatial"] > 0 for r in a["ratio_of_norms"])
    # timm zero-initialises the last BatchNorm of each block: f(z) = 0, an infinite ratio (null).
    assert [r["ratio"] for r in b["ratio_of_norms"]] == [None] * 8
    report = (out / "report.md").read_text()
    for name in FILES[:5]:
        assert f"]({name})" in report


def test_biased_fine_run_with_checkpoint_has_unit_diagonal(images, tmp_path, capsys, created_models):
    torch.manual_seed(1)
    import timm

    vit = timm.create_model(VIT, img_size=32, num_classes=10)
    ckpt = tmp_path / "vit.pth"
    torch.save({"state_dict": vit.state_dict()}, ckpt)
    out = tmp_path / "out"
    code, _, err = _run(capsys, *BASE, "--images", images, "--out", out, "--biased",
                        "--granularity", "fine", "--checkpoint-a", ckpt, "--num-images", 8)
    assert code == 0, err
    results, _ = _load(out)
    a, b = results["models"]["a"], results["models"]["b"]
    assert len(a["layers"]) == 72 and len(b["layers"]) == 16
    assert a["model_kwargs"]["num_classes"] == 10 and a["checkpoint"] == str(ckpt)
    for key in ("a_a", "b_b"):
        m = _matrix(results["cka"][key])
        # Biased CKA of a layer with itself is 1 up to float32 rounding of the activations (conventions §8).
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)
        assert np.all(m >= -1e-9) and np.all(m <= 1 + 1e-9)
    assert results["data"]["batches"] == [6]  # 8 images: one batch, the 2 left over are dropped
    assert all(_hook_count(m) == 0 for m in created_models) and len(created_models) == 2


def test_resume_after_interrupt_equals_uninterrupted(images, reference_run, tmp_path, capsys,
                                                     monkeypatch, created_models):
    out = tmp_path / "out"
    calls = {"n": 0}
    original = compare.Comparison.update

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(compare.Comparison, "update", interrupted)
    code, _, err = _run(capsys, *BASE, "--images", images, "--out", out)
    assert code == cli.EXIT_INTERRUPTED and "--resume" in err and "Traceback" not in err
    assert (out / "state.pt").is_file() and not (out / "results.json").exists()
    assert all(_hook_count(m) == 0 for m in created_models)
    monkeypatch.setattr(compare.Comparison, "update", original)

    code, _, err = _run(capsys, *BASE, "--images", images, "--out", out, "--resume")
    assert code == 0, err
    assert "warning: skipped 1 unreadable image file(s): a/broken.jpg" in err
    (got, got_arrays), (want, want_arrays) = _load(out), _load(reference_run)
    for key, value in want_arrays.items():
        np.testing.assert_array_equal(got_arrays[key], value, err_msg=key)
    assert got["cka"] == want["cka"] and got["models"] == want["models"]
    assert got["data"]["batches"] == want["data"]["batches"] and got["data"]["unreadable"] == 1

    # Different settings cannot continue this state.
    code, _, err = _run(capsys, *BASE, "--images", images, "--out", out, "--resume", "--biased")
    assert code == cli.EXIT_ERROR and "different settings" in err


def test_custom_model_with_layer_pattern(images, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compare", "mobilenetv3_small_050", "resnet18", "--images", images,
                        "--out", out, "--batch-size", "6", "--workers", "0", "--no-progress",
                        "--num-images", "6",
                        "--layers", r"blocks\.\d+|layer\d\.\d")
    assert code == 0, err
    results, _ = _load(out)
    a = results["models"]["a"]
    assert a["kind"] == "custom" and a["layers"] == [f"blocks.{i}" for i in range(6)]
    assert a["attention_distance"] is None and a["ratio_of_norms"] == []
    assert len(results["cka"]["a_b"]) == 6 and len(results["cka"]["a_b"][0]) == 8


@pytest.mark.parametrize("case", ["empty", "unreadable", "unknown_model", "unsupported", "checkpoint",
                                  "pretrained_and_checkpoint", "no_folder", "cuda"])
def test_errors_are_one_line_without_traceback(case, images, tmp_path, capsys):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG garbage")
    args = {
        "empty": ([VIT, "resnet18", "--images", empty], "no images in"),
        "unreadable": ([VIT, "resnet18", "--images", broken, "--img-size", "32"], "no readable images"),
        "unknown_model": (["vit_tiny_pach16_224", "resnet18", "--images", images],
                          "did you mean: vit_tiny_patch16_224"),
        "unsupported": (["mobilenetv3_small_050", "resnet18", "--images", images],
                        "supported: timm VisionTransformer.*--layers"),
        "checkpoint": ([VIT, "resnet18", "--images", images, "--checkpoint-a", tmp_path / "nope.pth"],
                       "checkpoint .*nope.pth' does not exist"),
        "pretrained_and_checkpoint": ([VIT, "resnet18", "--images", images, "--pretrained",
                                       "--checkpoint-b", tmp_path / "x.pth"], "either --pretrained"),
        "no_folder": ([VIT, "resnet18", "--images", tmp_path / "missing"], "does not exist"),
        "cuda": ([VIT, "resnet18", "--images", images, "--device", "cuda"], "CUDA is not available"),
    }
    argv, pattern = args[case]
    code, _, err = _run(capsys, "compare", *argv, "--out", tmp_path / "out", "--workers", "0",
                        "--no-progress")
    assert code == cli.EXIT_ERROR
    assert "Traceback" not in err and err.startswith("vitsim: error: ") and err.count("\n") == 1
    assert re.search(pattern, err), err


def test_demo_smoke(tmp_path, capsys):
    from vitsim.demo import run_demo

    results = run_demo(str(tmp_path), epochs=1, train_limit=64, progress=False, log=lambda *a: None)
    for name in FILES:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "vit.pth").is_file()
    assert results["data"]["images_used"] == 360 and results["data"]["batches"] == [120] * 3
    a = results["models"]["a"]
    assert a["grid"] == [8, 8] and a["patch_size"] == 4 and "heldout_accuracy" in a["training"]
