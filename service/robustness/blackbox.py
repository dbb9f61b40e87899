"""What a stranger sees of the served MI-Combined, at each response-detail level, as a black-box score function.

The server answers at ``MIXINFER_RESPONSE_DETAIL`` ``full`` (every class probability, label, flag, gap) or
``label`` (label, flag and the top-3 probabilities only). The cut is made by the server's own rule,
:func:`service.api.detail.answer_view`, on the engine's result; a score-based attacker works from the view it
returns: at ``label`` the probabilities outside the top 3 are unknown and read as 0 (so the margin the attacker
minimises is an upper bound: the attack is never helped by what it cannot see). Every query is one engine call
with fresh server randomness.

Shapes: images float32 (B, C, H, W) in [0, 1]; probabilities float32 (B, K).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast, get_args

import numpy as np
from numpy.typing import NDArray

from service.mi.engine import MIEngine, MIResult
from service.mi.params import Mode

if TYPE_CHECKING:
    from service.api.runtime import LoadedModel

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientView:
    """One response as the client receives it: label (B,), flag (B,), visible probabilities (B, K), 0 if hidden."""

    label: NDArray[np.int64]
    flagged: NDArray[np.bool_]
    probs: NDArray[np.float32]


@dataclass(frozen=True)
class _ServedModel:
    """The fields of the server's loaded model that :func:`answer_view` reads."""

    name: str
    version: str
    class_names: tuple[str, ...]
    threshold: float


def details() -> tuple[str, ...]:
    """The response-detail levels the server offers (``ResponseDetail``)."""
    from service.api.detail import ResponseDetail

    return tuple(get_args(ResponseDetail))


#: the response-detail levels, in report order
DETAILS: tuple[str, ...] = ("full", "label")


def client_view(result: MIResult, detail: str, class_names: tuple[str, ...] = (), threshold: float = 0.0) -> ClientView:
    """Cut an engine result down to what a response at ``detail`` shows, with the server's rule."""
    from service.api.detail import answer_view
    from service.api.inference import Answer

    if detail not in details():
        raise ValueError(f"response detail {detail!r}: expected one of {details()}")
    k = result.probs.shape[1]
    names = class_names or tuple(str(i) for i in range(k))
    model = cast("LoadedModel", _ServedModel("attacked", "0", names, threshold))
    flags: list[bool | None] = [bool(f) for f in result.flagged]
    view = answer_view(Answer(model, result, flags), detail)  # type: ignore[arg-type]
    probs = np.zeros_like(np.asarray(result.probs, dtype=np.float32))
    np.put_along_axis(probs, view.top_index, view.top_probability, axis=1)
    return ClientView(view.label, np.asarray(result.flagged, dtype=bool), probs)


def query_fn(engine: MIEngine, detail: str, mode: Mode = Mode.COMBINED) -> Callable[[NDArray[np.float32]], ClientView]:
    """A black-box oracle: each call is one fresh query of the served engine, seen at ``detail``."""

    def query(images: NDArray[np.float32]) -> ClientView:
        return client_view(engine(images, mode), detail)

    return query
