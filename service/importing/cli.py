"""``mixinfer import``: registration (imports nothing heavy) and the handler."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.importing.options import DEFAULT_PARITY_TOL, ImportRefusedError

LOGGER = logging.getLogger(__name__)

MI_FLAGS = (
    ("--lam-pl", "lam_pl", float, 0.5, "input weight of the MI-PL blends"),
    ("--n-pl", "n_pl", int, 5, "MI-PL blends per image"),
    ("--lam-ol", "lam_ol", float, 0.4, "input weight of MI-Combined's MI-OL branch"),
    ("--n-ol", "n_ol", int, 15, "blends of MI-Combined's MI-OL branch"),
    ("--lam-ol-standalone", "lam_ol_standalone", float, 0.5, "input weight of stand-alone MI-OL (mode ol)"),
    ("--n-ol-standalone", "n_ol_standalone", int, 30, "blends of stand-alone MI-OL"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mixinfer import`` to the dispatcher."""
    from service.training.cli import DATASET_CHOICES, _add_calibration_args

    p = subparsers.add_parser(
        "import",
        help="import an exported ONNX image classifier plus labelled images as a served, calibrated MI bundle",
        description="Wrap the model in the server's convention (NCHW float32 in [0, 1] -> logits) with adapter "
        "nodes inside the served graph, prove parity with the original on your images at batch 1 and above, split "
        "the images (pool, calibration, test), calibrate the detection threshold and record plain / MI accuracies "
        "through the real engine. Refusals exit with code 2 and one line: what, expected, got. See docs/import.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--onnx", type=Path, required=True, help="the exported model (one self-contained .onnx file)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, required=True, help="where the labelled images come from")
    p.add_argument("--data-dir", type=Path, default=None, help="class folders (imagefolder) or CIFAR python batches")
    p.add_argument("--name", required=True, help="model name: the bundle directory's parent")
    p.add_argument("--version", default="1", help="model version: a positive integer")
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store root")
    p.add_argument("--force", action="store_true", help="replace an existing bundle of that name and version")
    p.add_argument("--description", default="", help="free text for the manifest")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits")
    g = p.add_argument_group("what the model expects")
    g.add_argument("--input-layout", choices=("nchw", "nhwc"), default="nchw", help="the model input's layout")
    g.add_argument("--input-size", default=None, help="HxW, when the graph's spatial size is symbolic")
    g.add_argument("--pixel-range", choices=("0-1", "0-255"), default="0-1", help="pixel values the model expects")
    g.add_argument("--mean", default=None, help="per-channel mean (comma-separated, pixel-range units), if outside")
    g.add_argument("--std", default=None, help="per-channel std (comma-separated, pixel-range units), if outside")
    g.add_argument("--output", choices=("logits", "probabilities"), default="logits", help="what the model returns")
    g.add_argument("--class-names", type=Path, default=None, help="file: one class name per line, model order")
    g.add_argument("--input-name", default=None, help="the image input, when the graph has several")
    g.add_argument("--output-name", default=None, help="the class-score output, when the graph has several")
    g.add_argument("--parity-tol", type=float, default=DEFAULT_PARITY_TOL, help="largest accepted max |delta p|")
    g.add_argument("--test-dir", type=Path, default=None, help="labelled class folders the model never trained on")
    g.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: ORT's default)")
    m = p.add_argument_group("Mixup Inference parameters (SPEC 4.4 defaults)")
    for flag, dest, typ, default, text in MI_FLAGS:
        m.add_argument(flag, dest=dest, type=typ, default=default, help=text)
    _add_calibration_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler: exit 0 and print the bundle path, or exit 2 with one line on a refusal."""
    from service.errors import BundleError
    from service.importing.importer import run_import
    from service.importing.options import ImportOptions, parse_floats, parse_size

    try:
        opts = ImportOptions(
            onnx_path=args.onnx,
            dataset=args.dataset,
            data_dir=args.data_dir,
            name=args.name,
            version=args.version,
            store=args.store,
            force=args.force,
            input_layout=args.input_layout,
            input_size=parse_size(args.input_size) if args.input_size else None,
            pixel_range=args.pixel_range,
            mean=parse_floats(args.mean, "--mean") if args.mean else None,
            std=parse_floats(args.std, "--std") if args.std else None,
            output=args.output,
            class_names_file=args.class_names,
            input_name=args.input_name,
            output_name=args.output_name,
            parity_tol=args.parity_tol,
            test_dir=args.test_dir,
            seed=args.seed,
            eval_seed=args.eval_seed,
            threshold=args.threshold,
            target_fpr=args.target_fpr,
            mi={
                "lam_pl": args.lam_pl,
                "n_pl": args.n_pl,
                "ol_combined": {"lam": args.lam_ol, "n": args.n_ol},
                "ol_standalone": {"lam": args.lam_ol_standalone, "n": args.n_ol_standalone},
            },
            description=args.description,
            threads=args.threads or None,
            command=args.command_line,
        )
        path = run_import(opts)
    except (ImportRefusedError, BundleError, ValueError) as exc:
        print(f"mixinfer import: refused: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(path)
    return 0
