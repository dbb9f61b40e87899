"""ONNX Runtime backend: plain probabilities and averaged mix probabilities, host-mixed or fused on the device.

Two mixing paths sit behind :meth:`OrtBackend.mean_mix_probs` and give the same numbers (a test pins them):

- ``host``: numpy gathers the partners from a float32 copy of the pool, blends, and ONNX Runtime runs the
  classifier on the blends (one call per chunk of at most ``max_mixes_per_call``). Fastest on the CPU provider
  (SPEC 6.8: 0.86 of the compute floor against 0.39 for the fused graph).
- ``fused``: one ONNX graph built at load time (:func:`service.backends.fused.build_fused_model`) holds the pool as
  a uint8 initializer, gathers partners by index, scales, blends with ``lam``, runs the classifier, applies
  softmax and averages over N. On CUDA the pool stays on the device; per call only the images, the partner
  indices and the (B, K) result cross the bus.

``mixing="auto"`` picks ``fused`` when the session runs on CUDA and ``host`` otherwise.

Static shapes (``static_shapes="auto"``: on for GPU providers). ONNX Runtime's CUDA convolutions keep the cuDNN
state of the last input shape only: every change of shape re-plans every convolution. Measured on an H200
(onnxruntime-gpu 1.31.1, heuristic search): a session that alternates between two shapes pays ~8 ms per change on
the MNIST CNN and ~37 ms on a CIFAR ResNet-18, against 0.4 ms and 4 ms for a whole steady call of 64 x 5 blends;
the exhaustive search pays ~33 ms and ~200 ms. A micro-batching server changes shape on almost every call (batch
sizes vary, and so does the number of flagged rows that the OL branch runs). With static shapes every call is
padded to a power-of-two row bucket and each (graph, bucket, N) gets its own session, which only ever sees one
shape; the sessions are made by :meth:`OrtBackend.warmup` (or on first use). Padding rows are zeros (partner 0) and
are cut from the result, so the numbers are those of the unpadded call. Each session holds its own copy of the
weights, of the pool and of its memory arena on the device (with the defaults 28 sessions: about 1.3 GB of
weights for a ResNet-18).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from service.backends.base import Images, Logits, PartnerIndices, Probs
from service.errors import BackendError, ConfigError

if TYPE_CHECKING:
    import onnxruntime as ort

    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MixingPath = Literal["auto", "host", "fused"]
StaticShapes = Literal["auto", "on", "off"]
#: The micro-batcher produces many batch sizes (and B * N mix shapes); an exhaustive cuDNN search per new shape
#: would stall requests for hundreds of milliseconds, so the heuristic choice is used.
CUDA_OPTIONS: dict[str, str] = {"cudnn_conv_algo_search": "HEURISTIC"}
_GPU_PROVIDERS = (CUDA, "TensorrtExecutionProvider", "ROCMExecutionProvider")


def _bucket(rows: int, cap: int) -> int:
    """The smallest power of two >= ``rows``, but at most ``cap`` (callers never pass more than ``cap`` rows)."""
    return min(1 << (rows - 1).bit_length(), cap)


def _buckets_up_to(rows: int) -> list[int]:
    """Every power of two below ``rows``, and ``rows`` itself."""
    out = [1 << i for i in range(rows.bit_length()) if 1 << i < rows]
    return [*out, rows]


def _pad_rows(a: NDArray[Any], rows: int) -> NDArray[Any]:
    """``a`` with zero rows appended up to ``rows`` (``a`` itself when it already has them)."""
    if a.shape[0] == rows:
        return a
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def softmax(logits: Logits) -> Probs:
    """Row-wise softmax in float32, max-shifted for stability."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32, copy=False)


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


class OrtBackend:
    """A :class:`~service.backends.base.MixingBackend` over ONNX Runtime.

    Args:
        model_bytes: the ONNX model (e.g. the verified ``Bundle.model_bytes``): input float32 (B,C,H,W) in [0,1],
            output logits (B, K), dynamic batch.
        pool_images: uint8 (P, C, H, W), the bundle's pool (flat partner indices index its first axis).
        providers: execution providers in order of preference (a list or a comma-separated string).
            Refusal rule: if CUDA is asked for and the installed ONNX Runtime offers it, or CUDA is asked for with
            no CPU fallback listed, the session must really run on CUDA; a silent fallback to CPU (missing CUDA
            libraries) raises :class:`BackendError`. If the installed build has no CUDA at all and CPU is listed,
            the backend runs on CPU and logs a warning.
        mixing: ``auto`` (fused on GPU providers, host on CPU), ``host`` or ``fused``.
        static_shapes: ``auto`` (on for GPU providers), ``on`` or ``off``: pad every call to a power-of-two row
            bucket with one session per bucket (see the module doc).
        max_mixes_per_call: most images (plain or blended) in one ONNX Runtime call.
        intra_op_threads: ONNX Runtime intra-op threads (None: ORT's default, one per core).
        inter_op_threads: ONNX Runtime inter-op threads (None: ORT's default).
        input_name: the model's input name.
        output_name: the model's logits output name.
        expected_input_shape: (C, H, W) from the manifest; refused if the model disagrees.
        expected_n_classes: K from the manifest; refused if the model disagrees.
        source: where the model came from, for messages.

    Raises:
        BackendError: the model cannot be loaded, its signature disagrees with the pool or the manifest, or the
            providers cannot be honoured.
        ConfigError: invalid mixing, thread or chunk settings.
    """

    def __init__(
        self,
        model_bytes: bytes,
        pool_images: NDArray[np.uint8],
        *,
        providers: str | Sequence[str] = (CPU,),
        mixing: MixingPath = "auto",
        static_shapes: StaticShapes = "auto",
        max_mixes_per_call: int = 1024,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        input_name: str = "images",
        output_name: str = "logits",
        expected_input_shape: tuple[int, int, int] | None = None,
        expected_n_classes: int | None = None,
        source: str = "model.onnx",
    ) -> None:
        import onnxruntime as ort

        if mixing not in ("auto", "host", "fused"):
            raise ConfigError(f"mixing must be one of 'auto', 'host', 'fused', got {mixing!r}")
        if static_shapes not in ("auto", "on", "off"):
            raise ConfigError(f"static_shapes must be one of 'auto', 'on', 'off', got {static_shapes!r}")
        if max_mixes_per_call < 1:
            raise ConfigError(f"max_mixes_per_call must be >= 1, got {max_mixes_per_call}")
        for label, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and value < 0:
                raise ConfigError(f"{label} must be >= 0 (0: ONNX Runtime's default), got {value}")
        pool = np.asarray(pool_images)
        if pool.dtype != np.uint8 or pool.ndim != 4 or pool.shape[0] == 0:
            raise BackendError(f"pool images must be non-empty uint8 (P,C,H,W), got {pool.dtype} {pool.shape}")

        self.source = source
        self.asked_providers = parse_providers(providers)
        self.max_mixes_per_call = int(max_mixes_per_call)
        self.input_name = input_name
        self.output_name = output_name
        self._options = self._session_options(ort, intra_op_threads, inter_op_threads)
        self._ort_providers = providers_for_build(self.asked_providers, ort.get_available_providers())

        self._session = self._make_session(ort, model_bytes, "classifier")
        self.provider: str = self._session.get_providers()[0]
        check_no_fallback(self.asked_providers, self._ort_providers, self._session.get_providers())
        self.input_shape: tuple[int, int, int] = self._check_signature(self._session, pool, expected_input_shape)
        self.n_classes: int = self._find_n_classes(expected_n_classes)

        self.pool_size = int(pool.shape[0])
        on_gpu = self.provider in _GPU_PROVIDERS
        self.mixing: Literal["host", "fused"] = ("fused" if on_gpu else "host") if mixing == "auto" else mixing
        self.static_shapes: bool = on_gpu if static_shapes == "auto" else static_shapes == "on"
        self._ort = ort
        self._graphs: dict[str, bytes] = {"classifier": model_bytes}
        self._bucket_sessions: dict[tuple[str, int, int], ort.InferenceSession] = {}
        self._bucket_lock = threading.Lock()
        self._pool_f32: NDArray[np.float32] | None = None
        self._fused: ort.InferenceSession | None = None
        if self.mixing == "host":
            # the host path keeps the scaled pool in RAM: u8 / 255 exactly as the fused graph computes it
            self._pool_f32 = pool.astype(np.float32) / np.float32(255.0)
        else:
            from service.backends.fused import build_fused_model

            fused = build_fused_model(model_bytes, pool, input_name=input_name, output_name=output_name)
            self._graphs["fused"] = fused.SerializeToString()
            self._fused = self._make_session(ort, self._graphs["fused"], "fused MI graph")
        LOGGER.info(
            "ORT backend ready: provider %s (asked %s), mixing %s, static shapes %s, %d classes, input %s, pool %d, "
            "max %d mixes/call",
            self.provider,
            self.asked_providers,
            self.mixing,
            self.static_shapes,
            self.n_classes,
            self.input_shape,
            self.pool_size,
            self.max_mixes_per_call,
        )

    @classmethod
    def from_bundle(cls, bundle: Bundle, **kwargs: Any) -> OrtBackend:
        """A backend for a verified bundle, with the manifest's shapes and names checked; kwargs as in __init__."""
        spec = bundle.manifest.input
        return cls(
            bundle.model_bytes,
            bundle.pool_images,
            input_name=spec.name,
            output_name=spec.output_name,
            expected_input_shape=tuple(spec.shape),  # type: ignore[arg-type]
            expected_n_classes=bundle.manifest.n_classes,
            source=bundle.model_source,
            **kwargs,
        )

    # --- the MixingBackend API ---------------------------------------------------------------------------------
    def logits(self, images: Images) -> Logits:
        """f(images), float32 (B, K), in chunks of at most ``max_mixes_per_call`` images."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        out = np.empty((x.shape[0], self.n_classes), dtype=np.float32)
        step = self.max_mixes_per_call
        for s in range(0, x.shape[0], step):
            out[s : s + step] = self._run_classifier(x[s : s + step])
        return out

    __call__ = logits

    def probs(self, images: Images) -> Probs:
        """softmax(f(images)), float32 (B, K)."""
        return softmax(self.logits(images))

    def mean_mix_probs(self, images: Images, partners: PartnerIndices, lam: float) -> Probs:
        """mean_j softmax(f(lam * images[b] + (1 - lam) * pool[partners[b, j]] / 255)), float32 (B, K).

        Args:
            images: float32 (B, C, H, W) in [0, 1].
            partners: int64 (B, N) flat indices into the pool.
            lam: weight of the input, 0 < lam <= 1.
        """
        x = np.ascontiguousarray(images, dtype=np.float32)
        idx = np.ascontiguousarray(partners, dtype=np.int64)
        if idx.ndim != 2 or idx.shape[0] != x.shape[0] or idx.shape[1] < 1:
            raise ValueError(f"partners must be shaped ({x.shape[0]}, N >= 1), got {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.pool_size):
            raise ValueError(f"partners must index [0, {self.pool_size - 1}], got [{idx.min()}, {idx.max()}]")
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must be in (0, 1], got {lam}")
        if self.mixing == "host":
            return self._mean_mix_host(x, idx, float(lam))
        return self._mean_mix_fused(x, idx, float(lam))

    def warmup(self, batch_sizes: tuple[int, ...], mixes_per_image: tuple[int, ...] = (1,)) -> None:
        """Run the plain and the mix path once per batch size (and per N) so no request pays initialisation.

        With static shapes, every row bucket up to the largest batch size is run (and so gets its session): under
        load any batch size up to it, and any number of flagged rows, can come.
        """
        for b in batch_sizes:
            if b < 1:
                raise ConfigError(f"warm-up batch sizes must be >= 1, got {b}")
        sizes = set(batch_sizes)
        if self.static_shapes and sizes:
            sizes |= set(_buckets_up_to(max(sizes)))
        for b in sorted(sizes):
            x = np.zeros((b, *self.input_shape), dtype=np.float32)
            self.probs(x)
            for n in mixes_per_image:
                self.mean_mix_probs(x, np.zeros((b, n), dtype=np.int64), 0.5)
        LOGGER.info(
            "warmed up batch sizes %s, mixes per image %s (%d static-shape sessions)",
            sorted(sizes),
            mixes_per_image,
            len(self._bucket_sessions),
        )

    @property
    def static_sessions(self) -> list[tuple[str, int, int]]:
        """The (graph, rows, N) shapes that have their own session (static shapes), sorted."""
        return sorted(self._bucket_sessions)

    # --- mixing paths -----------------------------------------------------------------------------------------
    def _mean_mix_host(self, x: Images, idx: PartnerIndices, lam: float) -> Probs:
        assert self._pool_f32 is not None
        b, n = idx.shape
        flat_rows = np.repeat(np.arange(b), n)
        flat_idx = idx.reshape(-1)
        total = b * n
        probs = np.empty((total, self.n_classes), dtype=np.float32)
        step = self.max_mixes_per_call
        lam32 = np.float32(lam)
        one_minus = np.float32(1.0) - lam32
        buf = np.empty((min(step, total), *self.input_shape), dtype=np.float32)
        for s in range(0, total, step):
            e = min(s + step, total)
            m = buf[: e - s]
            np.multiply(x[flat_rows[s:e]], lam32, out=m)
            m += one_minus * self._pool_f32[flat_idx[s:e]]
            probs[s:e] = softmax(self._run_classifier(m))
        return probs.reshape(b, n, self.n_classes).mean(axis=1, dtype=np.float32)

    def _mean_mix_fused(self, x: Images, idx: PartnerIndices, lam: float) -> Probs:
        assert self._fused is not None
        b, n = idx.shape
        lam_arr = np.array(lam, dtype=np.float32)
        out = np.empty((b, self.n_classes), dtype=np.float32)
        step = self.max_mixes_per_call
        if n <= step:
            rows = max(1, step // n)
            for s in range(0, b, rows):
                out[s : s + rows] = self._run_fused(x[s : s + rows], idx[s : s + rows], lam_arr)
            return out
        # more blends per image than one call may hold: average per column chunk, weighted by chunk width
        for r in range(b):
            acc = np.zeros(self.n_classes, dtype=np.float64)
            for c in range(0, n, step):
                cols = idx[r : r + 1, c : c + step]
                acc += self._run_fused(x[r : r + 1], cols, lam_arr)[0].astype(np.float64) * cols.shape[1]
            out[r] = (acc / n).astype(np.float32)
        return out

    def _run_classifier(self, x: Images) -> Logits:
        rows = x.shape[0]
        if not self.static_shapes:
            return np.asarray(self._session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)
        bucket = _bucket(rows, self.max_mixes_per_call)
        session = self._bucket_session("classifier", bucket, 1)
        result = session.run([self.output_name], {self.input_name: _pad_rows(x, bucket)})[0]
        return np.asarray(result[:rows], dtype=np.float32)

    def _run_fused(self, x: Images, idx: PartnerIndices, lam: NDArray[np.float32]) -> Probs:
        assert self._fused is not None
        rows, n = idx.shape
        if not self.static_shapes:
            feeds = {"images": x, "partners": idx, "lam": lam}
            return np.asarray(self._fused.run(["mean_probs"], feeds)[0], dtype=np.float32)
        bucket = _bucket(rows, max(1, self.max_mixes_per_call // n))
        session = self._bucket_session("fused", bucket, n)
        feeds = {"images": _pad_rows(x, bucket), "partners": _pad_rows(idx, bucket), "lam": lam}
        return np.asarray(session.run(["mean_probs"], feeds)[0][:rows], dtype=np.float32)

    def _bucket_session(self, graph: str, rows: int, n: int) -> ort.InferenceSession:
        """The session that only ever runs ``graph`` on ``rows`` rows of ``n`` blends (made once, thread-safe)."""
        key = (graph, rows, n)
        session = self._bucket_sessions.get(key)
        if session is None:
            with self._bucket_lock:
                session = self._bucket_sessions.get(key)
                if session is None:
                    session = self._make_session(self._ort, self._graphs[graph], f"{graph} session for {rows}x{n}")
                    self._bucket_sessions[key] = session
        return session

    # --- construction helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _session_options(ort: Any, intra: int | None, inter: int | None) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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

    def _make_session(self, ort: Any, model_bytes: bytes, what: str) -> ort.InferenceSession:
        try:
            providers = [(p, CUDA_OPTIONS) if p == CUDA else p for p in self._ort_providers]
            return ort.InferenceSession(model_bytes, sess_options=self._options, providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot create the {what} session for {self.source}: {exc}") from exc

    def _check_signature(
        self, session: Any, pool: NDArray[np.uint8], expected: tuple[int, int, int] | None
    ) -> tuple[int, int, int]:
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
        if len(inputs) != 1 or inputs[0].name != self.input_name:
            raise BackendError(f"{self.source}: expected one input named {self.input_name!r}, got {names}")
        if inputs[0].type != "tensor(float)":
            raise BackendError(f"{self.source}: input must be tensor(float), got {inputs[0].type}")
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise BackendError(f"{self.source}: input must be 4-D (B,C,H,W), got {shape}")
        if isinstance(shape[0], int):
            raise BackendError(f"{self.source}: input must have a dynamic batch axis, got fixed {shape[0]}")
        model_chw = tuple(shape[1:])
        pool_chw = tuple(int(d) for d in pool.shape[1:])
        if model_chw != pool_chw:
            raise BackendError(
                f"{self.source}: model input shape must equal the pool image shape, expected {pool_chw} "
                f"(pool), got {model_chw} (model)"
            )
        if expected is not None and tuple(expected) != pool_chw:
            raise BackendError(
                f"{self.source}: model input shape must equal the manifest input shape, expected "
                f"{tuple(expected)} (manifest), got {pool_chw} (model and pool)"
            )
        if self.output_name not in [o.name for o in session.get_outputs()]:
            raise BackendError(
                f"{self.source}: expected an output named {self.output_name!r}, got "
                f"{[o.name for o in session.get_outputs()]}"
            )
        return (int(pool_chw[0]), int(pool_chw[1]), int(pool_chw[2]))

    def _find_n_classes(self, expected: int | None) -> int:
        out = next(o for o in self._session.get_outputs() if o.name == self.output_name)
        dims = list(out.shape)
        if len(dims) == 2 and isinstance(dims[1], int):
            k = int(dims[1])
        else:
            # a symbolic class axis (e.g. a Reshape to [batch, -1]): one forward of the plain session tells K
            feed = {self.input_name: np.zeros((1, *self.input_shape), dtype=np.float32)}
            probe = np.asarray(self._session.run([self.output_name], feed)[0])
            if probe.ndim != 2:
                raise BackendError(f"{self.source}: output must be (B, K) logits, got shape {probe.shape}")
            k = int(probe.shape[1])
        if k < 2:
            raise BackendError(f"{self.source}: output must have >= 2 classes, got {k}")
        if expected is not None and k != expected:
            raise BackendError(
                f"{self.source}: model output classes must equal the manifest's, expected {expected}, got {k}"
            )
        return k
