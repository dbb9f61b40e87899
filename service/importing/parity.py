"""Parity of the served graph with the user's original model on the user's own images.

The original runs on what the user's pipeline would feed it (:meth:`Adapters.model_input`), one image per call
(the one batch size every export supports); the served graph runs on ``uint8 / 255`` NCHW, once one image per call
and once ``batch`` images per call (a hard-coded Reshape in a fixed-batch export breaks only there). Both sides
are compared as probabilities (softmax of logits; a softmax output as it is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.importing.adapter import Adapters
from service.importing.graph import Source
from service.importing.options import ImportRefusedError, OutputKind

LOGGER = logging.getLogger(__name__)

PARITY_BATCH = 8


@dataclass(frozen=True)
class Parity:
    """max |delta p| against the original at batch 1 and at ``batch`` (inf where the served graph failed)."""

    n_images: int
    batch: int
    max_dp_batch1: float
    max_dp_batched: float
    error: str | None = None  #: why the batched run failed, if it did

    @property
    def worst(self) -> float:
        return max(self.max_dp_batch1, self.max_dp_batched)


def _softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _session(model_bytes: bytes):  # noqa: ANN202 - onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def original_outputs(src: Source, a: Adapters, images_u8: NDArray[np.uint8]) -> NDArray[np.float64]:
    """The original model's raw outputs (B, K) on uint8 (B, C, H, W) images, fed as the user's pipeline would."""
    sess = _session(src.original.SerializeToString())  # the user's file, not its opset conversion
    x = a.model_input(images_u8)
    step = 1  # the reference is the model at batch 1: the only batch every export supports
    out = [
        np.asarray(sess.run([src.output_name], {src.input_name: x[i : i + step]})[0], np.float64)
        for i in range(0, len(x), step)
    ]
    return np.concatenate(out).reshape(len(x), -1)


def as_probs(raw: NDArray[np.float64], kind: OutputKind) -> NDArray[np.float64]:
    """Probabilities from the original's outputs; refuses outputs that contradict ``--output``.

    Raises:
        ImportRefusedError: ``logits`` whose rows are already distributions (softmax inside: it would be applied
            twice), or ``probabilities`` whose rows are not.
    """
    is_dist = bool(np.all(raw >= 0.0) and np.allclose(raw.sum(axis=1), 1.0, atol=1e-3))
    if kind == "logits" and is_dist:
        raise ImportRefusedError(
            "--output logits: expected unnormalised scores, got rows that are probabilities (non-negative, sum 1): "
            "the model ends in softmax, pass --output probabilities"
        )
    if kind == "probabilities" and not is_dist:
        worst = float(np.max(np.abs(raw.sum(axis=1) - 1.0)))
        raise ImportRefusedError(
            f"--output probabilities: expected non-negative rows summing to 1, got min {raw.min():.3g} and row sums "
            f"off by up to {worst:.3g}: pass --output logits"
        )
    return raw if kind == "probabilities" else _softmax(raw)


def served_probs(model_bytes: bytes, images_u8: NDArray[np.uint8], step: int) -> NDArray[np.float64]:
    """softmax of the served graph's logits on ``uint8 / 255`` images, ``step`` images per call."""
    import onnxruntime as ort

    sess = _session(model_bytes)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing batched run is an expected outcome here, reported by the caller
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    x = np.ascontiguousarray(images_u8, dtype=np.float32) / np.float32(255.0)
    logits = [np.asarray(sess.run([out], {inp: x[i : i + step]}, quiet)[0], np.float64) for i in range(0, len(x), step)]
    return _softmax(np.concatenate(logits))


def check_parity(
    src: Source, a: Adapters, served: bytes, images_u8: NDArray[np.uint8], reference: NDArray[np.float64]
) -> Parity:
    """max |delta p| of the served graph against ``reference`` (:func:`as_probs` of :func:`original_outputs`), at
    batch 1 and batched."""
    one = float(np.max(np.abs(served_probs(served, images_u8, 1) - reference)))
    batch = min(PARITY_BATCH, len(images_u8))
    try:
        many = float(np.max(np.abs(served_probs(served, images_u8, batch) - reference)))
        error = None
    except Exception as exc:  # noqa: BLE001 - ORT refuses the shape: a hard-coded batch inside the graph
        many, error = float("inf"), str(exc).splitlines()[0][:200]
    # NaN anywhere is no parity (np.max propagates it, and max(1e-9, nan) would then be 1e-9)
    one, many = (v if np.isfinite(v) else float("inf") for v in (one, many))
    return Parity(len(images_u8), batch, one, many, error)
