"""The served model: load + warm a bundle, run batches through the MI engine with stage timing, swap atomically."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.typing import NDArray

from service.api.stats import ModelStats
from service.backends.base import Images, MixingBackend, PartnerIndices, Probs
from service.batching import MicroBatcher
from service.config import Settings
from service.errors import ClientError, ModelNotFoundError, NotReadyError
from service.manifest import Manifest
from service.metrics import Metrics
from service.mi.engine import MIEngine, MIResult
from service.mi.params import Mode
from service.preprocess import ImageSpec

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

#: wraps the real backend, e.g. to gate or slow it down in tests; identity by default
BackendWrapper = Callable[[MixingBackend], MixingBackend]
#: detection gaps kept per served version for ``GET /recent-gaps``
RECENT_GAPS = 500


class TimedBackend:
    """Passes every call to ``inner`` and times it as stage ``clean``, ``mix_pl`` or ``mix_ol``.

    The engine calls ``probs`` once (clean), then ``mean_mix_probs`` for PL and, if any image is flagged, for OL
    (only OL in mode ``ol``); :meth:`expect` tells it which mix stages the next engine call will use. Batches run
    on one worker thread, so this per-call state is safe.
    """

    def __init__(self, inner: MixingBackend, metrics: Metrics | None) -> None:
        self.inner = inner
        self.n_classes = inner.n_classes
        self.input_shape = inner.input_shape
        self.provider = inner.provider
        self._metrics = metrics
        self._stages: Iterator[str] = iter(())

    def attach_metrics(self, metrics: Metrics | None) -> None:
        """Start timing into ``metrics`` (after warm-up, so warm-up calls are not counted)."""
        self._metrics = metrics

    def expect(self, mode: Mode) -> None:
        self._stages = iter(("mix_ol",) if mode is Mode.OL else ("mix_pl", "mix_ol"))

    def probs(self, images: Images) -> Probs:
        t0 = time.perf_counter()
        out = self.inner.probs(images)
        self._observe("clean", t0)
        return out

    def mean_mix_probs(self, images: Images, partners: PartnerIndices, lam: float) -> Probs:
        t0 = time.perf_counter()
        out = self.inner.mean_mix_probs(images, partners, lam)
        self._observe(next(self._stages, "mix_ol"), t0)
        return out

    def warmup(self, batch_sizes: tuple[int, ...], mixes_per_image: tuple[int, ...] = (1,)) -> None:
        self.inner.warmup(batch_sizes, mixes_per_image)

    def _observe(self, stage: str, t0: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_stage(stage, time.perf_counter() - t0)


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, warmed-up bundle; immutable, swapped as a whole."""

    name: str
    version: str
    manifest: Manifest
    engine: MIEngine
    backend: TimedBackend
    spec: ImageSpec
    pool_size: int
    #: the latest computed detection gaps (event loop only), oldest first; a swapped-in version starts empty
    recent_gaps: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_GAPS), compare=False)
    #: inference statistics of this version (Triton's shape: GET /v2/models/{name}/stats)
    stats: ModelStats = field(default_factory=ModelStats, compare=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def threshold(self) -> float:
        return self.manifest.mi.threshold

    def run(self, images: NDArray[np.float32], mode: Mode) -> MIResult:
        """One engine call (worker thread)."""
        self.backend.expect(mode)
        t0 = time.perf_counter_ns()
        result = self.engine(images, mode)
        self.stats.executed(int(images.shape[0]), time.perf_counter_ns() - t0)
        return result


def read_bundle(settings: Settings, version: str | None) -> Bundle:
    """Resolve ``settings.model_name`` at ``version`` (None: the highest) once, and verify it. Blocking."""
    from service.store import load_bundle, resolve_bundle

    return load_bundle(resolve_bundle(settings.model_dir, settings.model_name, version))


def load_model(
    settings: Settings, bundle: Bundle, metrics: Metrics | None, wrap: BackendWrapper | None = None
) -> LoadedModel:
    """Serve a verified bundle: the backend over its model bytes and pool, the engine, warmed up. Blocking."""
    from service.store import open_backend

    t0 = time.perf_counter()
    inner: MixingBackend = open_backend(
        bundle,
        providers=settings.providers,
        mixing=settings.mixing,
        static_shapes=settings.static_shapes,
        max_mixes_per_call=settings.max_mixes_per_call,
        intra_op_threads=settings.intra_op_threads,
    )
    if wrap is not None:
        inner = wrap(inner)
    backend = TimedBackend(inner, None)  # warm-up is not timed into the metrics
    m = bundle.manifest
    engine = MIEngine(backend, bundle.pool_labels, m.mi, seed=settings.seed)
    sizes = tuple(sorted({1, settings.max_batch_images}))
    engine.warmup(sizes)
    warmup_rng = np.random.default_rng(0)  # keeps a seeded engine's own stream untouched by warm-up
    # engine.warmup ran the backend at every N and batch size; this runs the engine's own code once per mode
    for mode in (Mode.COMBINED, Mode.OL):
        backend.expect(mode)
        engine(np.zeros((sizes[-1], *m.input.shape), dtype=np.float32), mode, rng=warmup_rng)
    backend.attach_metrics(metrics)
    c, h, w = m.input.shape
    spec = ImageSpec(
        c,
        h,
        w,
        strict_size=settings.strict_size,
        max_pixels=settings.max_pixels,
        max_request_pixels=settings.max_pixels_per_request,
    )
    LOGGER.info(
        "loaded %s/%s (%s, %d classes, pool %d) in %.2f s",
        m.name,
        m.version,
        inner.provider,
        m.n_classes,
        len(bundle.pool_labels),
        time.perf_counter() - t0,
    )
    return LoadedModel(m.name, m.version, m, engine, backend, spec, len(bundle.pool_labels))


class Identity(NamedTuple):
    """What a model version serves: name, version, input shape and classes."""

    name: str
    version: str
    shape: tuple[int, int, int]
    class_names: tuple[str, ...]


class ModelHolder:
    """The current model and the batcher in front of it; ``swap`` installs a new model for the requests admitted
    after it (a request is pinned to the model current at admission, every piece of it runs there)."""

    def __init__(self, settings: Settings, metrics: Metrics, wrap: BackendWrapper | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.wrap = wrap
        self._model: LoadedModel | None = None
        self._swap_lock = asyncio.Lock()
        self._draining = False
        #: what was served before an admin unload (name, version, input shape, classes): load checks against it
        self._unloaded: Identity | None = None
        #: the event loop serving the app (set at start-up), for :meth:`start_drain` from a signal handler
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batcher: MicroBatcher[LoadedModel] = MicroBatcher(
            LoadedModel.run,
            pin=lambda: self.model,  # a request is answered by the model installed when it was admitted
            max_batch_images=settings.max_batch_images,
            max_delay_s=settings.max_queue_delay_s,
            max_queue_images=settings.max_queue_images,
            observer=metrics,
        )

    @property
    def ready(self) -> bool:
        """A model is loaded and warmed up and the server is not draining (what readiness answers)."""
        return self._model is not None and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def start_drain(self) -> None:
        """SIGTERM: readiness answers 503 from now on, so load balancers stop sending; requests in flight, and any
        that still arrive, are served. Safe in a signal handler and from any thread (one flag, one loop callback)."""
        self._draining = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.metrics.ready.set, 0)

    @property
    def unloaded(self) -> Identity | None:
        """What an admin unloaded (until the next load), else None."""
        return self._unloaded

    @property
    def current(self) -> LoadedModel | None:
        """The installed model, or None (loading, unloaded)."""
        return self._model

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            raise NotReadyError(self.not_ready_reason())
        return self._model

    def not_ready_reason(self) -> str:
        if self._draining:
            return "the server is shutting down"
        if self._unloaded is not None:
            return "the model was unloaded by an admin; nothing is served until it is loaded again"
        return "the model is still loading and warming up; retry shortly"

    def _identity(self) -> Identity:
        """What is served, or was until an unload."""
        if self._model is not None:
            m = self._model
            return Identity(m.name, m.version, m.spec.shape, m.class_names)
        if self._unloaded is not None:
            return self._unloaded
        raise NotReadyError(self.not_ready_reason())

    async def unload(self, name: str) -> Identity:
        """Stop serving ``name`` (Triton's unload): requests admitted already are answered by it, new ones get 503
        and readiness is 503 until :meth:`swap` loads a version again. Unloading what is unloaded is a no-op.

        Raises:
            ModelNotFoundError: ``name`` is not the served model.
        """
        async with self._swap_lock:
            served = self._identity()
            if name != served.name:
                raise ModelNotFoundError(f"this server serves model {served.name!r}, got {name!r}")
            if self._model is not None:
                self._model = None
                self._unloaded = served
                self.metrics.ready.set(0)
                LOGGER.info("unloaded %s version %s", served.name, served.version)
            return served

    def install(self, model: LoadedModel) -> None:
        self._model = model
        self._unloaded = None
        m = model.manifest
        self.metrics.set_model(
            name=model.name,
            version=model.version,
            provider=model.backend.provider,
            class_names=m.class_names,
            threshold=m.mi.threshold,
            flag_ratio=m.calibration.false_flag_rate,
            gap_quantiles=m.calibration.gap_quantiles,
            pool_images=model.pool_size,
        )
        self.metrics.ready.set(0 if self._draining else 1)

    async def load_initial(self, bundle: Bundle | None = None) -> None:
        """Serve ``bundle`` (verified already, e.g. by ``mixinfer serve``), else the configured version."""
        if bundle is None:
            bundle = await asyncio.to_thread(read_bundle, self.settings, self.settings.model_version)
        model = await asyncio.to_thread(load_model, self.settings, bundle, self.metrics, self.wrap)
        self.install(model)

    async def swap(self, name: str, version: str | None) -> LoadedModel:
        """Load ``name``/``version`` beside the current model, warm it, then swap; on failure keep serving the old.

        Raises:
            ModelNotFoundError: ``name`` is not the served model, or the version is not in the store listing.
            MixinferError: the new bundle failed to load (the old one keeps serving).
        """
        from service.store import list_versions

        current = self._identity()
        if name != current.name:
            raise ModelNotFoundError(
                f"this server serves model {current.name!r}, got {name!r}; serving another model needs a restart"
            )
        versions = list_versions(self.settings.model_dir, name)
        if version is not None and version not in versions:
            raise ModelNotFoundError(f"model {name!r} has versions {versions} in the store, got {version!r}")
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no versions in the store")
        async with self._swap_lock:
            bundle = await asyncio.to_thread(read_bundle, self.settings, version or versions[-1])
            model = await asyncio.to_thread(load_model, self.settings, bundle, self.metrics, self.wrap)
            old = self._identity()
            if model.spec.shape != old.shape or model.class_names != old.class_names:
                raise ClientError(
                    f"version {model.version} takes {model.spec.shape} with {len(model.class_names)} classes, the "
                    f"served version {old.version} takes {old.shape} with {len(old.class_names)}; a hot swap "
                    "keeps inputs and classes, restart the server to change them"
                )
            self.install(model)
            LOGGER.info("swapped %s from version %s to %s", name, old.version, model.version)
            return model
