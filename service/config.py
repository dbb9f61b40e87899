"""Runtime settings of the server, read from ``MIXINFER_*`` environment variables and refused at start-up if unsafe."""

from __future__ import annotations

import difflib
import ipaddress
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOGGER = logging.getLogger(__name__)

MiB = 1024 * 1024
#: keys shorter than this are accepted but logged as weak at start-up
_WEAK_KEY_CHARS = 16


#: ``MIXINFER_*`` variables that are not settings of the server but are read elsewhere: the container health check
#: (deploy/healthcheck.py), docker compose's published ports, the client's key (``mixinfer predict``) and the soak
#: test's length. ``mixinfer serve`` accepts them.
OTHER_VARIABLES = frozenset(
    {
        "MIXINFER_HEALTH_URL",
        "MIXINFER_PUBLISH",
        "MIXINFER_GRPC_PUBLISH",
        "MIXINFER_CLIENT_API_KEY",
        "MIXINFER_SOAK_REQUESTS",
    }
)
ENV_PREFIX = "MIXINFER_"


def _split_csv(value: object) -> object:
    """``"a, b"`` -> ``("a", "b")``; empty items are kept so that the validators can refuse them."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(","))
    return value


def read_key_file(path: Path, what: str) -> tuple[SecretStr, ...]:
    """The keys of ``path``, one per line (blank lines skipped, surrounding whitespace stripped).

    Symbolic links are followed, so a Kubernetes Secret mount (``key -> ..data/key``) works.

    Raises:
        ValueError: the file cannot be read or holds no key (never echoes a key).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {exc.__class__.__name__}: {exc}") from None
    keys = tuple(SecretStr(line.strip()) for line in text.splitlines() if line.strip())
    if not keys:
        raise ValueError(f"{what} {str(path)!r} holds no key; expected one key per line")
    return keys


class Settings(BaseSettings):
    """Every runtime knob of ``mixinfer serve``; calibrated numbers (lam, N, threshold, pool) live in the bundle."""

    model_config = SettingsConfigDict(env_prefix="MIXINFER_", frozen=True, extra="ignore", hide_input_in_errors=True)

    model_dir: Path = Field(default=Path("model_store"), description="root of the model store: <dir>/<name>/<version>/")
    model_name: str = Field(default="mnist-mixup", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="bundle name")
    model_version: str | None = Field(
        default=None, pattern=r"^[1-9][0-9]{0,8}$", description="version; unset = highest"
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="address uvicorn binds")
    port: int = Field(default=8000, ge=1, le=65535, description="port uvicorn binds")
    grpc_port: int | None = Field(
        default=None, ge=1, le=65535, description="port of the OIP v2 gRPC server on the same host; unset = no gRPC"
    )
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("CUDAExecutionProvider", "CPUExecutionProvider"),
        description="ONNX Runtime execution providers in order of preference (comma-separated)",
    )
    mixing: Literal["auto", "host", "fused"] = Field(default="auto", description="where blends are formed (backend)")
    static_shapes: Literal["auto", "on", "off"] = Field(
        default="auto", description="pad calls to power-of-two row buckets, one session each (auto: on GPU providers)"
    )
    intra_op_threads: int | None = Field(default=None, ge=1, le=256, description="ONNX Runtime intra-op threads")
    seed: int | None = Field(
        default=None, ge=0, description="fixed engine seed: tests and evaluation only; unset = OS entropy"
    )
    max_batch_images: int = Field(default=64, ge=1, le=65536, description="input images per engine call")
    max_mixes_per_call: int = Field(default=1024, ge=1, le=1 << 20, description="blends per backend call (chunking)")
    max_queue_delay_ms: float = Field(default=2.0, ge=0.0, le=10_000.0, description="longest wait of the oldest image")
    max_queue_images: int = Field(default=1024, ge=1, le=1 << 20, description="images waiting before 429")
    max_images_per_request: int = Field(default=256, ge=1, le=65536, description="images in one request before 413")
    max_body_bytes: int = Field(
        default=16 * MiB, ge=1024, le=1 << 31, description="request body limit (413), while reading"
    )
    max_pixels: int = Field(default=16 * MiB, ge=1, le=1 << 31, description="decoded pixels per image (413)")
    max_pixels_per_request: int = Field(
        default=64 * MiB, ge=1, le=1 << 40, description="decoded pixels of all images of one request (413)"
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0.0, le=3600.0, description="deadline from arrival to answer (504)"
    )
    strict_size: bool = Field(default=False, description="refuse images of another size instead of resizing them")
    allow_mode_override: bool = Field(default=False, description="let clients pick mode=pl|ol|off (off is undefended)")
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(), description="comma-separated bearer keys for /predict and /v2/models; unset = open"
    )
    admin_key: SecretStr | None = Field(
        default=None, description="bearer key of the admin routes; unset = admin disabled"
    )
    api_keys_file: Path | None = Field(
        default=None, description="file of bearer keys, one per line (added to api_keys; symlinks followed)"
    )
    admin_key_file: Path | None = Field(
        default=None, description="file holding the admin key on one line (instead of admin_key; symlinks followed)"
    )
    rate_limit_per_key: float | None = Field(
        default=None, gt=0.0, description="requests per second per key (or client)"
    )
    latency_p99_target_s: float = Field(
        default=1.0, gt=0.0, le=3600.0, description="p99 prediction latency the alert MixinferLatencyHigh holds to"
    )
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="comma-separated addresses or networks of proxies whose X-Forwarded-For is believed; "
        "unset = none: the client is the TCP peer",
    )
    response_detail: Literal["label", "full"] = Field(
        default="label",
        description="label: label, flag and top-3 probabilities; full: also the gap, threshold, all probabilities",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="serve /metrics on this port only (unset: on the main port)"
    )
    metrics_key: SecretStr | None = Field(default=None, description="bearer key that /metrics requires (unset: open)")
    log_json: bool = Field(default=True, description="JSON log lines (access log included)")
    # --- query-attack watch (docs/query-watch.md) ---------------------------------------------------------------
    query_watch: Literal["off", "observe", "reject", "ban"] = Field(
        default="observe", description="near-copy query detection: off | observe (metrics, log) | reject | ban"
    )
    query_watch_window_s: float = Field(
        default=600.0, gt=0.0, le=86_400.0, description="how long queries are remembered (s)"
    )
    query_watch_max_mb: float = Field(
        default=64.0, gt=0.0, le=65_536.0, description="memory cap of the remembered queries (MiB)"
    )
    query_watch_resends: int = Field(
        default=3, ge=0, le=1_000_000, description="exact resends of one image per client before each counts as a hit"
    )
    query_watch_ban_hits: int = Field(
        default=10, ge=1, le=1_000_000, description="hits in the window that make a client suspect (ban: banned)"
    )
    query_watch_ban_s: float = Field(default=600.0, gt=0.0, le=604_800.0, description="ban length (s)")

    @field_validator("providers", mode="before")
    @classmethod
    def _providers_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("providers")
    @classmethod
    def _providers_nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not p for p in value):
            raise ValueError(f"providers must be a comma-separated list of non-empty names, got {list(value)}")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies_csv(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return ()
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies items must be IP addresses or networks (10.0.0.0/8), got {item!r}"
                ) from None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_csv(cls, value: object) -> object:
        if isinstance(value, str) and value.strip() == "":
            raise ValueError("api_keys is set but empty; unset it to run without keys, or give at least one key")
        return _split_csv(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_nonempty(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(value):
            if not key.get_secret_value():
                raise ValueError(f"api_keys item {i} is empty; every key needs >= 1 non-blank character")
        return value

    @field_validator("admin_key", "metrics_key")
    @classmethod
    def _key_nonblank(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            guards = "the admin routes" if info.field_name == "admin_key" else "its check"
            raise ValueError(f"{info.field_name} is set but blank; unset it to disable {guards}, or give a key")
        return value

    _api_key_bytes: tuple[bytes, ...] = PrivateAttr(default=())
    _admin_key: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_key_files(self) -> Settings:
        """Read the key files once, here: a missing or empty file refuses the start like a bad value."""
        keys = self.api_keys
        if self.api_keys_file is not None:
            keys = (*keys, *read_key_file(self.api_keys_file, "api_keys_file"))
        self._api_key_bytes = tuple(k.get_secret_value().encode() for k in keys)
        admin = self.admin_key
        if self.admin_key_file is not None:
            if admin is not None:
                raise ValueError("admin_key and admin_key_file are both set; set one")
            admin_keys = read_key_file(self.admin_key_file, "admin_key_file")
            if len(admin_keys) != 1:
                raise ValueError(f"admin_key_file holds {len(admin_keys)} keys, expected exactly 1")
            admin = admin_keys[0]
        self._admin_key = admin
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(f"grpc_port ({self.grpc_port}) must differ from port ({self.port})")
        if self.max_batch_images > self.max_queue_images:
            raise ValueError(
                f"max_batch_images ({self.max_batch_images}) must be <= max_queue_images ({self.max_queue_images})"
            )
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must be <= max_queue_images "
                f"({self.max_queue_images}), or such a request could never be queued"
            )
        if self.max_pixels > self.max_pixels_per_request:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) must be <= max_pixels_per_request ({self.max_pixels_per_request}), "
                "or an image within the per-image limit could never be served"
            )
        admin = self.admin_key_value()
        if admin is not None and admin in self._api_key_bytes:
            raise ValueError("admin_key must differ from every api key: an API key never authorises admin routes")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"metrics_port ({self.metrics_port}) must differ from port ({self.port})")
        return self

    # ---------------------------------------------------------------------------------------------------------
    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def drain_s(self) -> int:
        """Seconds uvicorn lets requests in flight finish after SIGTERM (a container stop must wait longer)."""
        return max(1, int(self.request_timeout_s))

    def api_key_values(self) -> tuple[bytes, ...]:
        """Every API key (``api_keys`` then ``api_keys_file``) as bytes, for constant-time comparison; every front
        end (HTTP, gRPC) checks keys against this."""
        return self._api_key_bytes

    def admin_key_value(self) -> bytes | None:
        """The admin key (``admin_key`` or ``admin_key_file``) as bytes; None: admin routes disabled."""
        return None if self._admin_key is None else self._admin_key.get_secret_value().encode()

    def metrics_key_value(self) -> bytes | None:
        """The bearer key /metrics requires; None: /metrics is open."""
        return None if self.metrics_key is None else self.metrics_key.get_secret_value().encode()

    def log_open_metrics(self) -> None:
        """Warn when anyone who reaches the service port reads /metrics: besides the threshold and the calibrated
        gap quantiles it holds a histogram of every answered query's gap and the query watch's hit counts, so a
        client reading it before and after a query learns that query's gap bucket and whether it was counted."""
        if self.metrics_port is None and self.metrics_key is None:
            LOGGER.warning(
                "/metrics is open on the service port: it publishes the threshold, each answered query's gap bucket "
                "and the query watch's hit counts to any client; set MIXINFER_METRICS_PORT or MIXINFER_METRICS_KEY "
                "where strangers reach the service"
            )

    def log_weak_keys(self) -> None:
        """Warn (never log the key) when a configured key is short."""
        weak = [i for i, k in enumerate(self._api_key_bytes) if len(k) < _WEAK_KEY_CHARS]
        if weak:
            LOGGER.warning("api key items %s are shorter than %d characters", weak, _WEAK_KEY_CHARS)
        for name, key in (("admin_key", self.admin_key_value()), ("metrics_key", self.metrics_key_value())):
            if key is not None and len(key) < _WEAK_KEY_CHARS:
                LOGGER.warning("%s is shorter than %d characters", name, _WEAK_KEY_CHARS)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``MIXINFER_*`` variable of ``environ`` that no setting reads, naming the closest known one.

    ``Settings`` ignores unknown variables, so a typo such as ``MIXINFER_API_KEY`` would leave a server open;
    ``mixinfer serve`` refuses to start while this list is not empty.
    """
    known = sorted({ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES)
    messages = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        suffixes = {k.removeprefix(ENV_PREFIX): k for k in known}  # the shared prefix would make every name close
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.6)
        hint = f"; did you mean {suffixes[close[0]]}?" if close else f"; known: {', '.join(known)}"
        messages.append(f"{name} is not a mixinfer setting{hint}")
    return messages
