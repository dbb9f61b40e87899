"""What the client hands back: typed results of /predict, /health and /info, and its one exception type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """A request failed: the server's error code and message, or a transport failure (``status`` None).

    Attributes:
        status: the HTTP status, None when no answer came (connection refused, timeout).
        code: the server's machine-readable code (``unauthorized``, ``invalid_input``, ...), or ``connection_error``
            / ``timeout`` / ``bad_response`` for failures on the way.
        message: the server's message (what was wrong, expected, got).
        request_id: the ``X-Request-ID`` the server answered with, for its logs.
        retry_after_s: the ``Retry-After`` of a 429/503, in seconds.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{where} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's answer. Fields the server's ``MIXINFER_RESPONSE_DETAIL`` withholds are None (or empty).

    Attributes:
        label: the predicted class name.
        adversarial: the detection flag; None in modes ``ol`` and ``off``.
        mode: the branch that answered: ``pl``, ``ol`` or ``off``.
        model: the served model's name.
        model_version: the served version that answered.
        class_index: the predicted class index, when given.
        probabilities: class name -> probability, as many classes as the server returns (top 3 by default).
        gap: the detection gap (plain top-1 confidence minus max MI-PL probability), when the server gives it.
        threshold: the model's detection threshold, when the server gives it.
        mixes: blends averaged for this image, when given.
    """

    label: str
    adversarial: bool | None
    mode: str
    model: str
    model_version: str
    class_index: int | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    gap: float | None = None
    threshold: float | None = None
    mixes: int | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """``live``: the process answers; ``ready``: a model is loaded and warmed up."""

    live: bool
    ready: bool


@dataclass(frozen=True, slots=True)
class Metadata:
    """What ``GET /info`` tells a client with a valid key: the served model and how much the server discloses.

    Attributes:
        server_version: the mixinfer version of the server.
        model: the served model's name.
        model_version: the served version.
        classes: the class names, in index order.
        input_shape: one image as the model takes it: (channels, height, width).
        response_detail: ``label`` (label, flag, top-3 probabilities) or ``full`` (also gap, threshold, all
            probabilities).
    """

    server_version: str
    model: str
    model_version: str
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    response_detail: str


def parse_predictions(body: Any) -> list[Prediction]:
    """The predictions of a ``/predict`` body (see the server's ``PredictResponse``).

    Raises:
        ApiError: ``bad_response`` when the body does not have that shape.
    """
    try:
        model, version = str(body["model"]), str(body["version"])
        return [_prediction(p, model, version) for p in body["predictions"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(200, "bad_response", f"unexpected /predict body ({exc!r}): {str(body)[:200]}") from None


def _prediction(p: dict[str, Any], model: str, version: str) -> Prediction:
    gap = p.get("detection_gap")
    threshold = p.get("threshold")
    index = p.get("class_index")
    mixes = p.get("mixes")
    adversarial = p.get("adversarial")
    return Prediction(
        label=str(p["label"]),
        adversarial=None if adversarial is None else bool(adversarial),
        mode=str(p["mode"]),
        model=model,
        model_version=version,
        class_index=None if index is None else int(index),
        probabilities={str(k): float(v) for k, v in (p.get("probabilities") or {}).items()},
        gap=None if gap is None else float(gap),
        threshold=None if threshold is None else float(threshold),
        mixes=None if mixes is None else int(mixes),
    )


def parse_metadata(body: Any) -> Metadata:
    """The body of ``GET /info``.

    Raises:
        ApiError: ``bad_response`` when the body does not have that shape.
    """
    try:
        return Metadata(
            server_version=str(body["server_version"]),
            model=str(body["model"]),
            model_version=str(body["version"]),
            classes=tuple(str(c) for c in body["classes"]),
            input_shape=tuple(int(d) for d in body["input_shape"]),
            response_detail=str(body["response_detail"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(200, "bad_response", f"unexpected /info body ({exc!r}): {str(body)[:200]}") from None
