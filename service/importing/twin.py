"""The differentiable twin of an imported bundle: its served graph converted to torch with ``onnx2torch``.

Gradient attacks need torch; the served graph is the one thing that is scored, so the twin is made from it (not
from the user's original) and checked against ONNX Runtime on the same inputs. The uint8 adapter
(Round -> Clip -> Cast) has no gradient; in the twin Round passes gradients straight through and the Cast keeps
float values (they are already integers in [0, 255]), so the model behind it sees the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from service.importing.adapter import CAST_NODE, ROUND_NODE

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

#: the largest max |delta p| between the twin and the served ONNX graph for the twin to be used
TWIN_TOL = 1e-3


class TwinUnavailableError(RuntimeError):
    """The served graph cannot be converted to a faithful torch twin; ``str(exc)`` says why."""


class StraightThroughRound(nn.Module):
    """round(x) forward, identity backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.round(x) - x).detach()


class KeepFloat(nn.Module):
    """The uint8 Cast of the adapter, kept in float so that gradients flow (values are integers already)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class TwinCheck:
    """What the conversion check measured."""

    max_dp: float
    n_images: int
    zero_gradient_images: int


def convert_served(model_bytes: bytes) -> nn.Module:
    """onnx2torch conversion of the served graph, with the straight-through uint8 adapter; eval mode, frozen.

    Raises:
        TwinUnavailableError: onnx2torch cannot convert an operator of the graph.
    """
    import onnx
    from onnx2torch import convert

    try:
        module: Any = convert(onnx.load_model_from_string(model_bytes))
    except Exception as exc:  # noqa: BLE001 - onnx2torch raises plain exceptions for unsupported operators
        raise TwinUnavailableError(
            f"onnx2torch cannot convert the served graph: {str(exc).splitlines()[0][:200]}"
        ) from None
    names = dict(module.named_children())
    if ROUND_NODE in names:
        setattr(module, ROUND_NODE, StraightThroughRound())
    if CAST_NODE in names:
        setattr(module, CAST_NODE, KeepFloat())
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _ort_probs(model_bytes: bytes, x: NDArray[np.float32]) -> NDArray[np.float32]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    logits = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: x})[0]
    return torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=1).numpy()


def check_twin(twin: nn.Module, model_bytes: bytes, images_u8: NDArray[np.uint8]) -> TwinCheck:
    """max |delta p| of the twin against ONNX Runtime on ``images_u8`` and how many have an all-zero gradient.

    Raises:
        TwinUnavailableError: the twin fails to run or disagrees by more than :data:`TWIN_TOL`.
    """
    x = np.ascontiguousarray(images_u8, dtype=np.float32) / np.float32(255.0)
    xt = torch.from_numpy(x).requires_grad_(True)
    try:
        logits = twin(xt)
    except Exception as exc:  # noqa: BLE001 - any failure of the converted module means no twin
        raise TwinUnavailableError(f"the converted twin fails to run: {str(exc).splitlines()[0][:200]}") from None
    dp = float(np.max(np.abs(torch.softmax(logits.float(), 1).detach().numpy() - _ort_probs(model_bytes, x))))
    if not dp <= TWIN_TOL:
        raise TwinUnavailableError(
            f"the converted twin disagrees with the served graph: max |dp| {dp:.3g} > {TWIN_TOL}"
        )
    torch.log_softmax(logits.float(), 1).max(dim=1).values.sum().backward()
    assert xt.grad is not None
    zero = int((xt.grad.flatten(1).abs().sum(1) == 0).sum())
    if zero:
        LOGGER.warning(
            "the twin's gradient is exactly zero for %d of %d images: gradient attacks cannot move them", zero, len(x)
        )
    return TwinCheck(dp, len(x), zero)


def bundle_twin(bundle: Bundle, n_check: int = 16) -> nn.Module:
    """The checked twin of an imported bundle (served graph -> torch), on the CPU in eval mode.

    Raises:
        TwinUnavailableError: no faithful twin (the evaluation then runs the black-box attacks only).
    """
    data = bundle.model_bytes  # the bytes the store hashed
    twin = convert_served(data)
    check = check_twin(twin, data, np.asarray(bundle.pool_images[:: max(1, len(bundle.pool_images) // n_check)]))
    LOGGER.info(
        "twin of %s: onnx2torch, max |dp| %.2e against the served graph on %d pool images",
        bundle.path,
        check.max_dp,
        check.n_images,
    )
    return twin
