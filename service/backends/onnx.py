"""ONNX Runtime backend: plain probabilities and averaged mix probabilities, host-mixed or fused on the device.

Two mixing paths sit behind :meth:`OrtBackend.mean_mix_probs` and give the same numbers (a test pins them):

- ``host``: numpy gathers the partners from a float32 copy of the pool, blends, and ONNX Runtime runs the
  classifier on the blends (one call per chunk of at most ``max_mixes_per_call``). Fastest on the CPU provider
  (SPEC 6.8: 0.86 of the compute floor against 0.39 for the fused graph).
- ``fused``: one ONNX graph built at load time (:func:`service.backends.fused.build_fused_model`) holds the pool as
  a uint8 initializer, gathers partners by index, scales, blends with ``lam``, runs the classifier, applies
  softmax and averages over N. On CUDA the pool stays on the device; per call only the images, the partner
  indices and the (B, K) result cross the bus.

``mixing="auto"`` picks ``fused`` when the session runs on CUDA and ``host`` otherwise. The other parts live
beside this module: provider policy and session creation in :mod:`service.backends.providers`, static-shape
buckets in :mod:`service.backends.shapes`, the model and pool checks in :mod:`service.backends.signature`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from service.backends.base import Images, Logits, PartnerIndices, Probs
from service.backends.providers import CPU, GPU_PROVIDERS, SessionFactory, parse_providers
from service.backends.shapes import BucketSessions, bucket, buckets_up_to, pad_rows
from service.backends.signature import check_classes, check_pool_images, check_signature, read_signature
from service.errors import BackendError, ConfigError

LOGGER = logging.getLogger(__name__)

MixingPath = Literal["auto", "host", "fused"]
StaticShapes = Literal["auto", "on", "off"]


def softmax(logits: Logits) -> Probs:
    """Row-wise softmax in float32, max-shifted for stability."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32, copy=False)


class OrtBackend:
    """A :class:`~service.backends.base.MixingBackend` over ONNX Runtime.

    Args:
        model_bytes: the ONNX model (e.g. the verified ``Bundle.model_bytes``): input float32 (B,C,H,W) in [0,1],
            output logits (B, K), dynamic batch.
        pool_images: uint8 (P, C, H, W), the bundle's pool (flat partner indices index its first axis).
        providers: execution providers in order of preference (a list or a comma-separated string); the
            refusal rule is in :mod:`service.backends.providers`.
        mixing: ``auto`` (fused on GPU providers, host on CPU), ``host`` or ``fused``.
        static_shapes: ``auto`` (on for GPU providers), ``on`` or ``off``: pad every call to a power-of-two row
            bucket with one session per bucket (:mod:`service.backends.shapes`).
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
        if mixing not in ("auto", "host", "fused"):
            raise ConfigError(f"mixing must be one of 'auto', 'host', 'fused', got {mixing!r}")
        if static_shapes not in ("auto", "on", "off"):
            raise ConfigError(f"static_shapes must be one of 'auto', 'on', 'off', got {static_shapes!r}")
        if max_mixes_per_call < 1:
            raise ConfigError(f"max_mixes_per_call must be >= 1, got {max_mixes_per_call}")
        pool = np.asarray(pool_images)
        self.source = source
        self._refuse_unless(check_pool_images, pool)
        self.max_mixes_per_call = int(max_mixes_per_call)
        self.input_name = input_name
        self.output_name = output_name
        self._factory = SessionFactory(parse_providers(providers), intra_op_threads, inter_op_threads, source)
        self._session = self._factory.make(model_bytes, "classifier")
        self.provider: str = self._session.get_providers()[0]
        self._factory.check_no_fallback(self._session)
        self.input_shape: tuple[int, int, int] = (int(pool.shape[1]), int(pool.shape[2]), int(pool.shape[3]))
        self.n_classes: int = self._check_model(model_bytes, expected_input_shape, expected_n_classes)

        self.pool_size = int(pool.shape[0])
        on_gpu = self.provider in GPU_PROVIDERS
        self.mixing: Literal["host", "fused"] = ("fused" if on_gpu else "host") if mixing == "auto" else mixing
        self.static_shapes: bool = on_gpu if static_shapes == "auto" else static_shapes == "on"
        self._graphs: dict[str, bytes] = {"classifier": model_bytes}
        self._buckets = BucketSessions(lambda graph, what: self._factory.make(self._graphs[graph], what))
        self._pool_f32: NDArray[np.float32] | None = None
        self._fused: Any = None
        if self.mixing == "host":
            # the host path keeps the scaled pool in RAM: u8 / 255 exactly as the fused graph computes it
            self._pool_f32 = pool.astype(np.float32) / np.float32(255.0)
        else:
            from service.backends.fused import build_fused_model

            fused = self._refuse_unless(
                build_fused_model, model_bytes, pool, input_name=input_name, output_name=output_name
            )
            self._graphs["fused"] = fused.SerializeToString()
            self._fused = self._factory.make(self._graphs["fused"], "fused MI graph")
        LOGGER.info(
            "ORT backend ready: provider %s (asked %s), mixing %s, static shapes %s, %d classes, input %s, pool %d, "
            "max %d mixes/call",
            self.provider,
            self._factory.asked,
            self.mixing,
            self.static_shapes,
            self.n_classes,
            self.input_shape,
            self.pool_size,
            self.max_mixes_per_call,
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
            sizes |= set(buckets_up_to(max(sizes)))
        for b in sorted(sizes):
            x = np.zeros((b, *self.input_shape), dtype=np.float32)
            self.probs(x)
            for n in mixes_per_image:
                self.mean_mix_probs(x, np.zeros((b, n), dtype=np.int64), 0.5)
        LOGGER.info(
            "warmed up batch sizes %s, mixes per image %s (%d static-shape sessions)",
            sorted(sizes),
            mixes_per_image,
            len(self._buckets),
        )

    @property
    def static_sessions(self) -> list[tuple[str, int, int]]:
        """The (graph, rows, N) shapes that have their own session (static shapes), sorted."""
        return self._buckets.shapes

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
            result = self._session.run([self.output_name], {self.input_name: x})[0]
        else:
            size = bucket(rows, self.max_mixes_per_call)
            session = self._buckets.get("classifier", size, 1)
            result = session.run([self.output_name], {self.input_name: pad_rows(x, size)})[0]
            self._check_output_shape(result.shape, size, self.n_classes)
            result = result[:rows]
        self._check_output_shape(result.shape, rows, self.n_classes)
        return np.asarray(result, dtype=np.float32)

    def _run_fused(self, x: Images, idx: PartnerIndices, lam: NDArray[np.float32]) -> Probs:
        assert self._fused is not None
        rows, n = idx.shape
        if not self.static_shapes:
            feeds = {"images": x, "partners": idx, "lam": lam}
            result = self._fused.run(["mean_probs"], feeds)[0]
        else:
            size = bucket(rows, max(1, self.max_mixes_per_call // n))
            session = self._buckets.get("fused", size, n)
            feeds = {"images": pad_rows(x, size), "partners": pad_rows(idx, size), "lam": lam}
            result = session.run(["mean_probs"], feeds)[0]
            self._check_output_shape(result.shape, size, self.n_classes)
            result = result[:rows]
        self._check_output_shape(result.shape, rows, self.n_classes)
        return np.asarray(result, dtype=np.float32)

    # --- construction helpers -----------------------------------------------------------------------------------
    def _refuse_unless(self, check: Any, *args: Any, **kwargs: Any) -> Any:
        """``check(...)``, its ValueError turned into a BackendError that names the model."""
        try:
            return check(*args, **kwargs)
        except ValueError as exc:
            raise BackendError(f"{self.source}: {exc}") from exc

    def _check_model(self, model_bytes: bytes, shape: tuple[int, int, int] | None, n_classes: int | None) -> int:
        """The model's signature against the pool and the manifest; K (by one forward when it is symbolic)."""
        import onnx

        sig = read_signature(onnx.load_model_from_string(model_bytes))
        k = self._refuse_unless(
            check_signature,
            sig,
            input_name=self.input_name,
            output_name=self.output_name,
            pool_shape=self.input_shape,
            expected_shape=shape,
            expected_classes=n_classes,
        )
        # one forward of two rows: what the model returns, not what it declares (declared shapes can be wrong, a
        # row per image is not declared at all); it also finds K when the class axis is symbolic ([batch, -1])
        feed = {self.input_name: np.zeros((2, *self.input_shape), dtype=np.float32)}
        probe = np.asarray(self._session.run([self.output_name], feed)[0])
        if k is None:  # 0: not even 2-D, refused just below
            k = int(probe.shape[1]) if probe.ndim == 2 else 0
            if k:
                self._refuse_unless(check_classes, k, n_classes, self.output_name)
        self._check_output_shape(probe.shape, 2, k)
        return int(k)

    def _check_output_shape(self, got: tuple[int, ...], rows: int, k: int) -> None:
        """One row of K logits per input image, or a BackendError (a broadcast would copy one answer to all)."""
        if tuple(got) != (rows, k):
            raise BackendError(
                f"{self.source}: output {self.output_name!r} must be (rows, K) = ({rows}, {k or 'K'}) for a batch of "
                f"{rows} images, got {tuple(got)}"
            )
