"""Execution-provider policy and ONNX Runtime session creation.

Refusal rule: if CUDA is asked for and the installed ONNX Runtime offers it, or CUDA is asked for with no CPU
fallback listed, the session must really run on CUDA; a silent fallback to CPU (missing CUDA libraries) raises
:class:`~service.errors.BackendError`. If the installed build has no CUDA at all and CPU is listed, the backend
runs on CPU and logs a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from service.errors import BackendError, ConfigError

LOGGER = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: providers that run on a GPU: mixing "auto" fuses there, static shapes "auto" turn on
GPU_PROVIDERS = (CUDA, "TensorrtExecutionProvider", "ROCMExecutionProvider")
#: The micro-batcher produces many batch sizes (and B * N mix shapes); an exhaustive cuDNN search per new shape
#: would stall requests for hundreds of milliseconds, so the heuristic choice is used.
CUDA_OPTIONS: dict[str, str] = {"cudnn_conv_algo_search": "HEURISTIC"}


def parse_providers(providers: str | Sequence[str]) -> list[str]:
    """``"CUDAExecutionProvider,CPUExecutionProvider"`` or a sequence -> a clean, non-empty list."""
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    out = [p.strip() for p in items if p.strip()]
    if not out:
        raise ConfigError(f"providers must name at least one ONNX Runtime execution provider, got {providers!r}")
    return out


def providers_for_build(asked: list[str], available: Sequence[str]) -> list[str]:
    """The asked providers this ONNX Runtime build offers, in order; refuses when CUDA is required but absent.

    CUDA counts as required when it is asked for without a CPU fallback. When the build lacks CUDA and CPU is
    listed, CUDA is dropped with a warning (e.g. the default ``CUDA,CPU`` on a CPU-only install).

    Raises:
        BackendError: CUDA required but not in the build, or none of the asked providers available.
    """
    offered = set(available)
    usable = [p for p in asked if p in offered]
    dropped = [p for p in asked if p not in offered]
    if CUDA in dropped and CPU not in asked:
        raise BackendError(
            f"providers {asked} require CUDA, but this ONNX Runtime build offers only {sorted(offered)} "
            "(install onnxruntime-gpu, or add CPUExecutionProvider to MIXINFER_PROVIDERS)"
        )
    if not usable:
        raise BackendError(f"none of the providers {asked} is available, this build offers {sorted(offered)}")
    if dropped:
        LOGGER.warning(
            "providers %s are not in this ONNX Runtime build (%s); using %s", dropped, sorted(offered), usable
        )
    return usable


def check_no_fallback(asked: list[str], passed: list[str], got: Sequence[str]) -> None:
    """Refuse when CUDA was passed to ONNX Runtime (the build offers it) but the session silently fell back.

    ONNX Runtime does that when the CUDA or cuDNN libraries are missing or incompatible.

    Args:
        asked: the providers from the configuration.
        passed: what was given to the session (:func:`providers_for_build`).
        got: ``session.get_providers()``.

    Raises:
        BackendError: the session does not run on CUDA although CUDA was asked for and offered.
    """
    if CUDA in passed and CUDA not in got:
        raise BackendError(
            f"CUDA was asked for (providers {asked}) and this ONNX Runtime build offers it, but the session fell "
            f"back to {list(got)}: the CUDA/cuDNN libraries are missing or incompatible. Fix the CUDA installation, "
            "or set MIXINFER_PROVIDERS=CPUExecutionProvider to run on CPU on purpose"
        )


class SessionFactory:
    """Makes ONNX Runtime sessions with one set of options and providers (every session of one backend).

    Args:
        providers: asked providers (the configuration), filtered by :func:`providers_for_build`.
        intra_op_threads: ONNX Runtime intra-op threads (None: ORT's default, one per core).
        inter_op_threads: ONNX Runtime inter-op threads (None: ORT's default).
        source: where the model came from, for messages.
    """

    def __init__(
        self, providers: list[str], intra_op_threads: int | None, inter_op_threads: int | None, source: str
    ) -> None:
        import onnxruntime as ort

        for label, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and value < 0:
                raise ConfigError(f"{label} must be >= 0 (0: ONNX Runtime's default), got {value}")
        self.ort = ort
        self.asked = providers
        self.passed = providers_for_build(providers, ort.get_available_providers())
        self.options = self._options(intra_op_threads, inter_op_threads)
        self.source = source

    def _options(self, intra: int | None, inter: int | None) -> Any:
        opts = self.ort.SessionOptions()
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        if intra is not None:
            opts.intra_op_num_threads = int(intra)
        if inter is not None:
            opts.inter_op_num_threads = int(inter)
        # ORT's pool threads spin after every run by default: in a server they burn the cores the event loop needs
        # (measured by bench/http.py on 2 cores, default bundle: 3.8 -> 1.45 ms CPU per request at 1 client,
        # 1.7 -> 1.2 ms at 32, throughput 1.7-3.5x); waking them costs microseconds against ms-long runs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        return opts

    def make(self, model_bytes: bytes, what: str) -> Any:
        """A session for ``model_bytes`` (``what`` names it in messages).

        Raises:
            BackendError: ONNX Runtime cannot create it.
        """
        try:
            providers = [(p, CUDA_OPTIONS) if p == CUDA else p for p in self.passed]
            return self.ort.InferenceSession(model_bytes, sess_options=self.options, providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot create the {what} session for {self.source}: {exc}") from exc

    def check_no_fallback(self, session: Any) -> None:
        """:func:`check_no_fallback` for a session this factory made."""
        check_no_fallback(self.asked, self.passed, session.get_providers())
