"""Export a trained network to one self-contained ONNX file plus ``weights.safetensors``, checked for parity.

The ONNX graph takes ``images`` float32 (B, C, H, W) in [0, 1] with a dynamic batch axis and returns ``logits``
(B, K); the normalisation is inside. The legacy TorchScript exporter (``dynamo=False``) is used: it writes a
single file with the weights embedded, which the store requires. The export is refused (and its files removed)
unless ``onnx.checker`` passes and ONNX Runtime agrees with torch to ``tol`` on every logit of the parity set.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from service.manifest import MODEL_FILE, WEIGHTS_FILE
from service.training.models import Classifier, save_weights
from service.training.train import to_float

LOGGER = logging.getLogger(__name__)
OPSET = 17
PARITY_TOL = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ExportError(RuntimeError):
    """The exported model is invalid or disagrees with torch; nothing is left behind."""


@dataclass(frozen=True)
class ExportReport:
    """What the export checked."""

    model_path: Path
    weights_path: Path
    n_parity: int
    max_abs_diff: float
    opset: int


def parity_inputs(
    input_shape: tuple[int, int, int], n_random: int, samples: NDArray[np.uint8] | None, seed: int = 0
) -> NDArray[np.float32]:
    """Uniform random images in [0, 1], plus real images (uint8) when given, plus the two constant extremes."""
    rng = np.random.default_rng(seed)
    parts = [rng.random((n_random, *input_shape), dtype=np.float32)]
    parts += [np.zeros((1, *input_shape), np.float32), np.ones((1, *input_shape), np.float32)]
    if samples is not None and len(samples):
        parts.append(to_float(samples).numpy())
    return np.concatenate(parts).astype(np.float32)


def check_parity(model: Classifier, onnx_path: Path, x: NDArray[np.float32], tol: float = PARITY_TOL) -> float:
    """Max |logit_torch - logit_ort| over ``x``; raises :class:`ExportError` above ``tol``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    worst = 0.0
    for i in range(0, len(x), 256):
        chunk = x[i : i + 256]
        (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: chunk})
        with torch.no_grad():
            want = model(torch.from_numpy(chunk)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"{onnx_path}: ORT output shape {got.shape}, torch gives {want.shape}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    if not np.isfinite(worst) or worst > tol:
        raise ExportError(
            f"{onnx_path}: ORT-vs-torch max |delta logit| = {worst:.3g} over {len(x)} inputs, expected <= {tol}"
        )
    return worst


def export_onnx(model: Classifier, path: Path, input_shape: tuple[int, int, int], opset: int = OPSET) -> None:
    """Write ``model`` (eval mode, CPU) as one self-contained ONNX file with a dynamic batch axis, checked."""
    import onnx

    model = model.eval().cpu()
    dummy = torch.zeros((2, *input_shape), dtype=torch.float32)
    with warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (single self-contained file); its deprecation notice is noise
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # our networks read static spatial sizes (only the batch axis is dynamic); other modules still warn
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"service\.training\.models")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(
            f"{path}: initializers {external[:3]} are stored externally, expected one self-contained file"
        )
    side_files = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if side_files:
        raise ExportError(f"{path}: the exporter wrote side files {side_files}, expected none")


def export_bundle_model(
    model: Classifier,
    bundle_dir: Path,
    input_shape: tuple[int, int, int],
    *,
    samples: NDArray[np.uint8] | None = None,
    n_random: int = 256,
    tol: float = PARITY_TOL,
) -> ExportReport:
    """Write ``model.onnx`` and ``weights.safetensors`` into ``bundle_dir`` after the checker and parity pass.

    Args:
        model: the trained network (any device; exported from a CPU copy).
        bundle_dir: target directory (created).
        input_shape: (C, H, W).
        samples: real uint8 images added to the parity set (e.g. the calibration split).
        n_random: uniform random images in the parity set.
        tol: the largest accepted |delta logit|.

    Raises:
        ExportError: checker or parity failure; both files are removed.
    """
    import onnx

    bundle_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = bundle_dir / MODEL_FILE
    weights_path = bundle_dir / WEIGHTS_FILE
    model = model.eval().cpu()
    try:
        export_onnx(model, onnx_path, input_shape)
        x = parity_inputs(input_shape, n_random, samples)
        worst = check_parity(model, onnx_path, x, tol)
        save_weights(model, weights_path)
    except (ExportError, onnx.checker.ValidationError) as exc:
        onnx_path.unlink(missing_ok=True)
        weights_path.unlink(missing_ok=True)
        raise ExportError(str(exc)) from exc
    LOGGER.info("exported %s (opset %d): parity max |delta logit| %.2e over %d inputs", onnx_path, OPSET, worst, len(x))
    return ExportReport(onnx_path, weights_path, len(x), worst, OPSET)
