"""What an answer shows a client: the one rule behind ``MIXINFER_RESPONSE_DETAIL``, for every front end.

``label`` (the default) shows the label, the adversarial flag and the three most probable classes; ``full`` adds
what SPEC section 4.3 lists beyond that: the detection gap, the threshold and every class probability. The exact gap,
the threshold and the whole distribution together are a tuning oracle for an adaptive attacker, so an anonymous
deployment keeps ``label``.

Front ends call :func:`answer_view` once per answer and render the :class:`AnswerView` it returns:
:func:`rest_predictions` for ``/predict``, :func:`oip_tensors` for Open Inference Protocol v2 (HTTP here, gRPC
alike), :func:`oip_output_metadata` for the model metadata. A front end never reads the engine result itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from service.api.inference import Answer
from service.api.runtime import LoadedModel
from service.api.schemas import INPUT_DATATYPE
from service.config import Settings
from service.errors import InvalidInputError

LOGGER = logging.getLogger(__name__)

ResponseDetail = Literal["label", "full"]
#: classes shown per image at ``label`` detail
TOP_CLASSES = 3
#: OIP v2 outputs per detail, in the order returned by default
OIP_OUTPUTS: dict[ResponseDetail, tuple[str, ...]] = {
    "label": ("label", "adversarial", "top_classes", "top_probabilities"),
    "full": ("probabilities", "label", "adversarial", "detection_gap"),
}


@dataclass(frozen=True)
class AnswerView:
    """The part of one answer a client may see, per image (leading dimension B).

    At ``label`` detail ``probabilities``, ``gap``, ``threshold`` and ``mixes`` are None.
    """

    detail: ResponseDetail
    model: str
    version: str
    class_names: tuple[str, ...]
    label: NDArray[np.int64]
    adversarial: list[bool | None]
    branch: tuple[str, ...]
    #: (B, t) class indices, most probable first (all in class order when t is every class), their probabilities
    top_index: NDArray[np.int64]
    top_probability: NDArray[np.float32]
    probabilities: NDArray[np.float32] | None
    gap: NDArray[np.float32] | None
    threshold: float | None
    mixes: NDArray[np.int64] | None


def answer_view(answer: Answer, detail: ResponseDetail, top_k: int | None = None) -> AnswerView:
    """What ``detail`` lets a client see of ``answer``.

    Args:
        answer: the engine's answer to one request.
        detail: the server's ``response_detail``.
        top_k: classes to list per image (default: every class at ``full``, :data:`TOP_CLASSES` at ``label``);
            capped at :data:`TOP_CLASSES` at ``label`` detail.
    """
    res, names = answer.result, answer.model.class_names
    shown = len(names) if top_k is None else top_k
    if detail == "label":
        shown = min(shown, TOP_CLASSES)
    shown = min(shown, len(names))
    full = detail == "full"
    if shown == len(names):  # every class: in class order, as /predict always listed them
        order = np.broadcast_to(np.arange(shown, dtype=np.int64), res.probs.shape)
    else:
        order = np.argsort(-res.probs, axis=1, kind="stable")[:, :shown]
    return AnswerView(
        detail=detail,
        model=answer.model.name,
        version=answer.model.version,
        class_names=names,
        label=res.label,
        adversarial=answer.adversarial,
        branch=tuple(b.value for b in res.branch),
        top_index=order,
        top_probability=np.take_along_axis(res.probs, order, axis=1),
        probabilities=res.probs if full else None,
        gap=res.gap if full else None,
        threshold=answer.model.threshold if full else None,
        mixes=res.n_mixes if full else None,
    )


def rest_predictions(view: AnswerView) -> dict[str, Any]:
    """The ``/predict`` response body (see :class:`service.api.schemas.PredictResponse`)."""
    names = view.class_names
    labels = view.label.tolist()
    tops, top_probs = view.top_index.tolist(), view.top_probability.tolist()
    gaps = view.gap.tolist() if view.gap is not None else None
    mixes = view.mixes.tolist() if view.mixes is not None else None
    predictions = []
    for i, label in enumerate(labels):
        item: dict[str, Any] = {
            "label": names[label],
            "class_index": label,
            "probabilities": {names[j]: p for j, p in zip(tops[i], top_probs[i], strict=True)},
            "adversarial": view.adversarial[i],
            "mode": view.branch[i],
        }
        if gaps is not None and mixes is not None:
            gap = gaps[i]
            item["detection_gap"] = None if math.isnan(gap) else gap
            item["threshold"] = view.threshold
            item["mixes"] = mixes[i]
        predictions.append(item)
    return {"model": view.model, "version": view.version, "predictions": predictions}


def oip_tensors(view: AnswerView) -> dict[str, tuple[str, NDArray[Any]]]:
    """OIP v2 output name -> (datatype, array): the outputs of :data:`OIP_OUTPUTS` for the view's detail."""
    names = np.array([n.encode() for n in view.class_names], dtype=object)
    tensors: dict[str, tuple[str, NDArray[Any]]] = {
        "label": ("BYTES", names[view.label]),
        "adversarial": ("BOOL", np.array([bool(a) for a in view.adversarial], dtype=bool)),
    }
    if view.probabilities is not None and view.gap is not None:
        tensors["probabilities"] = ("FP32", view.probabilities)
        tensors["detection_gap"] = ("FP32", view.gap)
    else:
        tensors["top_classes"] = ("BYTES", names[view.top_index])
        tensors["top_probabilities"] = ("FP32", view.top_probability)
    return tensors


def oip_output_metadata(detail: ResponseDetail, n_classes: int) -> list[dict[str, Any]]:
    """The ``outputs`` of the OIP model metadata at ``detail``."""
    top = min(TOP_CLASSES, n_classes)
    shapes: dict[str, tuple[str, list[int]]] = {
        "probabilities": ("FP32", [-1, n_classes]),
        "label": ("BYTES", [-1]),
        "adversarial": ("BOOL", [-1]),
        "detection_gap": ("FP32", [-1]),
        "top_classes": ("BYTES", [-1, top]),
        "top_probabilities": ("FP32", [-1, top]),
    }
    return [{"name": n, "datatype": shapes[n][0], "shape": shapes[n][1]} for n in OIP_OUTPUTS[detail]]


def model_metadata_doc(model: LoadedModel, settings: Settings) -> dict[str, Any]:
    """OIP model metadata (REST and gRPC): input [-1, C, H, W] FP32 in [0, 1]; the outputs of the response detail."""
    from service.store import list_versions

    c, h, w = model.spec.shape
    return {
        "name": model.name,
        "versions": list_versions(settings.model_dir, model.name) or [model.version],
        "platform": "mixinfer_onnxruntime",
        "inputs": [{"name": model.manifest.input.name, "datatype": INPUT_DATATYPE, "shape": [-1, c, h, w]}],
        "outputs": oip_output_metadata(settings.response_detail, len(model.class_names)),
    }


def check_requested_outputs(requested: list[tuple[str, bool]], detail: ResponseDetail) -> None:
    """Refuse an OIP output this server's detail withholds, naming the ones it returns.

    Raises:
        InvalidInputError: an output outside :data:`OIP_OUTPUTS` of ``detail``.
    """
    available = OIP_OUTPUTS[detail]
    for name, _binary in requested:
        if name not in available:
            raise InvalidInputError(
                f"output {name!r} is not returned at MIXINFER_RESPONSE_DETAIL={detail}; outputs are {list(available)}"
            )
