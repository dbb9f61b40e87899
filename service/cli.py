"""The ``mixinfer`` command: one entry point whose sub-commands live next to the code they drive.

Each area registers its sub-commands through ``register(subparsers)``; registration imports nothing heavy
(torch is imported inside the handlers), so ``mixinfer serve`` works in the lean serving environment.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Sequence

from service import __version__

#: modules exposing ``register(subparsers: argparse._SubParsersAction) -> None``
COMMAND_MODULES = (
    "service.api.cli",
    "service.client.cli",
    "service.training.cli",
    "service.importing.cli",
    "service.robustness.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixinfer",
        description="Mixup Inference model server: serve, predict, build bundles, evaluate robustness.",
    )
    parser.add_argument("--version", action="version", version=f"mixinfer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


#: third-party modules of the optional extras, and the extra that brings each
EXTRA_OF_MODULE = {
    "torch": "train",
    "torchvision": "train",
    "onnxscript": "train",
    "mlxtend": "train",
    "safetensors": "train",
    "tqdm": "train",
    "matplotlib": "eval",
    "scipy": "eval",
    "torchattacks": "eval",
    "onnx2torch": "eval",
    "onnxruntime": "cpu",
    "httpx": "client",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mixinfer``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # what manifests and run records store as "the command": the arguments parsed here, which are the process's
    # own only when mixinfer runs as a program (a caller of main(argv) is not the command that ran)
    args.command_line = "mixinfer " + shlex.join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF_MODULE:
            raise
        extra = EXTRA_OF_MODULE[top]
        hint = "torchattacks: pip install --no-deps torchattacks==3.5.1" if top == "torchattacks" else ""
        print(
            f"mixinfer {args.command}: needs the '{extra}' extra, missing module {top!r}; "
            f"install it with `pip install -e '.[{extra}]'` (or `make install`). {hint}".rstrip(),
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
