"""The `vitsim` command: `vitsim compare MODEL_A MODEL_B ...` and `vitsim demo`.

User errors (unknown model, empty image folder, missing checkpoint, ...) print one line to
stderr and exit with status 1, no traceback; Ctrl-C exits with 130 after saving the state file.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _add_compare(subparsers) -> None:
    from .compare import CPU_BATCH_SIZE, DTYPES, PAPER_BATCH_SIZE, PAPER_NUM_IMAGES

    p = subparsers.add_parser(
        "compare", help="compare two timm models (CKA heatmaps, attention distance, ratio of norms)",
        description="Compare two timm models the way Raghu et al. (2021) do: minibatch CKA between "
                    "all layers, mean attention distance per head, ratio of norms across skip "
                    "connections. Writes figures, results.json/.npz and report.md to --out.")
    p.add_argument("model_a", metavar="MODEL_A", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("model_b", metavar="MODEL_B", help="timm model name, e.g. resnet50")
    p.add_argument("--images", metavar="DIR",
                   help="folder of images, searched recursively (jpg, jpeg, png, webp); default: "
                        "the 1,797 handwritten digits scikit-learn ships (no download)")
    p.add_argument("--num-images", type=int, default=PAPER_NUM_IMAGES, metavar="N",
                   help=f"use at most N images (default {PAPER_NUM_IMAGES}, as in the paper; 0 = all)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help=f"minibatch size of minibatch CKA (default {PAPER_BATCH_SIZE} on CUDA as in "
                        f"the paper, {CPU_BATCH_SIZE} on CPU); the activations of one minibatch "
                        "are held in memory, and the CKA values depend on it")
    p.add_argument("--pretrained", action="store_true",
                   help="load timm's pretrained weights (downloads them)")
    p.add_argument("--checkpoint-a", metavar="PATH", help="state dict file for MODEL_A")
    p.add_argument("--checkpoint-b", metavar="PATH", help="state dict file for MODEL_B")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="dtype of the forward passes (default float32)")
    est = p.add_mutually_exclusive_group()
    est.add_argument("--unbiased", dest="unbiased", action="store_true", default=True,
                     help="unbiased HSIC estimator (default, as in the paper)")
    est.add_argument("--biased", dest="unbiased", action="store_false", help="biased HSIC estimator")
    p.add_argument("--granularity", default="blocks", choices=["blocks", "fine"],
                   help="blocks: every block output; fine: also the representations inside each "
                        "block (default blocks)")
    p.add_argument("--layers", metavar="PATTERN",
                   help="regular expression selecting the captured modules by name (full match), "
                        "e.g. 'blocks\\.\\d+'; needed for models other than ViTs and ResNets")
    p.add_argument("--img-size", type=int, metavar="PX",
                   help="build both models for this input size (timm img_size; ViTs only)")
    p.add_argument("--out", default="vitsim-report", metavar="DIR",
                   help="output folder (default ./vitsim-report)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from DIR/state.pt")
    p.add_argument("--workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)),
                   help="image decoding worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from .compare import CompareConfig, run

    cfg = CompareConfig(
        model_a=args.model_a, model_b=args.model_b, images=args.images,
        num_images=args.num_images or None, batch_size=args.batch_size, pretrained=args.pretrained,
        checkpoint_a=args.checkpoint_a, checkpoint_b=args.checkpoint_b, device=args.device,
        dtype=args.dtype, unbiased=args.unbiased, granularity=args.granularity, layers=args.layers,
        out=args.out, resume=args.resume, workers=args.workers, seed=args.seed,
        img_size=args.img_size, progress=not args.no_progress)
    run(cfg)
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small ViT and ResNet on scikit-learn's digits and compare them (no download)",
        description="Train a small timm ViT and a small timm ResNet on the handwritten digits that "
                    "scikit-learn ships (a few minutes on 2 CPU cores), then run compare on the "
                    "held-out digits and write the report.")
    p.add_argument("--out", default="vitsim-demo", metavar="DIR",
                   help="output folder (default ./vitsim-demo)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs of both models (default: the demo's settings)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and training")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, seed=args.seed, device=args.device,
             progress=not args.no_progress)
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitsim", description="Representation analyses of Raghu et al. (2021) for timm models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_compare(subparsers)
    _add_demo(subparsers)
    try:
        from .bench.cli import add_parser as add_bench
    except ImportError:
        add_bench = None
    if add_bench is not None:
        add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vitsim` command; returns the exit status."""
    from .compare import CompareError

    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return int(args.func(args) or 0)
        except CompareError as exc:
            print(f"vitsim: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            out = getattr(args, "out", None)
            if args.command == "compare" and out:
                print(f"vitsim: interrupted; progress saved in {os.path.join(out, 'state.pt')}, "
                      "rerun the same command with --resume to continue", file=sys.stderr)
            else:
                print("vitsim: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            # Shown after the progress bar has finished, once each.
            quiet = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
            shown = [str(w.message) for w in caught if not issubclass(w.category, quiet)]
            for message in dict.fromkeys(shown):
                print(f"vitsim: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
