"""What ``mixinfer import`` is told about the exported model, and how it refuses (one line: what, expected, got)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Layout = Literal["nchw", "nhwc"]
PixelRange = Literal["0-1", "0-255"]
OutputKind = Literal["logits", "probabilities"]

#: the largest accepted max |delta p| between the original model and the served graph (--parity-tol default)
DEFAULT_PARITY_TOL = 1e-4
#: MI is expected to cost accuracy on a model not trained with mixup; above this loss against plain, warn
MI_LOSS_WARNING = 0.03
#: refuse when plain accuracy is below chance + this share of the way from chance to 100 %
NEAR_CHANCE_SHARE = 0.2
TRAINING_DATA_UNKNOWN = "training data unknown; the user asserts that the test images are held out"


class ImportRefusedError(ValueError):
    """The model or the data cannot be imported; ``str(exc)`` is one line naming what, expected and got."""


@dataclass(frozen=True)
class ImportOptions:
    """Everything ``mixinfer import`` needs (the CLI fills it from its flags).

    Attributes:
        onnx_path: the user's exported model.
        dataset, data_dir: the labelled images (``imagefolder``: ``data_dir/<class>/*.png``).
        name, version, store, force: where the bundle goes.
        input_layout: ``nchw`` or ``nhwc`` (what the model takes).
        input_size: (H, W) when the graph's spatial size is symbolic.
        pixel_range: ``0-1`` or ``0-255`` (what the model expects).
        mean, std: per-channel normalisation in the units of ``pixel_range`` when it is outside the graph.
        output: ``logits`` or ``probabilities`` (a model that ends in softmax).
        class_names_file: one class name per line, in the model's output order.
        input_name, output_name: the image input and the class-score output when the graph has several.
        parity_tol: the largest accepted max |delta p| against the original model.
        test_dir: a labelled folder the model never trained on (the test split); None draws one from the data.
        seed, eval_seed, threshold, target_fpr, mi: as ``mixinfer bundle``.
        command: the exact command line (recorded in the manifest).
    """

    onnx_path: Path
    dataset: str
    data_dir: Path | None
    name: str
    version: str = "1"
    store: Path = Path("model_store")
    force: bool = False
    input_layout: Layout = "nchw"
    input_size: tuple[int, int] | None = None
    pixel_range: PixelRange = "0-1"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    output: OutputKind = "logits"
    class_names_file: Path | None = None
    input_name: str | None = None
    output_name: str | None = None
    parity_tol: float = DEFAULT_PARITY_TOL
    test_dir: Path | None = None
    seed: int = 0
    eval_seed: int = 2020
    threshold: float | None = None
    target_fpr: float = 0.05
    mi: dict[str, object] = field(default_factory=dict)
    description: str = ""
    threads: int | None = 1
    command: str = "mixinfer import"


def parse_size(text: str) -> tuple[int, int]:
    """``"32x32"`` -> (32, 32); refuses anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ImportRefusedError(f"--input-size: expected HxW with positive integers (e.g. 32x32), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` -> (0.5, 0.5, 0.5); refuses anything else."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ImportRefusedError(f"{flag}: expected comma-separated numbers (one per channel), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ImportRefusedError(f"{flag}: expected finite numbers (one per channel), got {text!r}")
    return values
