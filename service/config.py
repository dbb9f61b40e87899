"""Runtime settings of the server, read from ``MIXINFER_*`` environment variables and refused at start-up if unsafe."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOGGER = logging.getLogger(__name__)

MiB = 1024 * 1024
#: keys shorter than this are accepted but logged as weak at start-up
_WEAK_KEY_CHARS = 16


def _split_csv(value: object) -> object:
    """``"a, b"`` -> ``("a", "b")``; empty items are kept so that the validators can refuse them."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(","))
    return value


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
    rate_limit_per_key: float | None = Field(
        default=None, gt=0.0, description="requests per second per key (or client)"
    )
    latency_p99_target_s: float = Field(
        default=1.0, gt=0.0, le=3600.0, description="p99 prediction latency the alert MixinferLatencyHigh holds to"
    )
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

    @field_validator("admin_key")
    @classmethod
    def _admin_nonempty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("admin_key is set but blank; unset it to disable the admin routes, or give a key")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
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
        if self.admin_key is not None and any(
            k.get_secret_value() == self.admin_key.get_secret_value() for k in self.api_keys
        ):
            raise ValueError("admin_key must differ from every api key: an API key never authorises admin routes")
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
        """The API keys as bytes, for constant-time comparison."""
        return tuple(k.get_secret_value().encode() for k in self.api_keys)

    def log_weak_keys(self) -> None:
        """Warn (never log the key) when a configured key is short."""
        weak = [i for i, k in enumerate(self.api_keys) if len(k.get_secret_value()) < _WEAK_KEY_CHARS]
        if weak:
            LOGGER.warning("api_keys items %s are shorter than %d characters", weak, _WEAK_KEY_CHARS)
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < _WEAK_KEY_CHARS:
            LOGGER.warning("admin_key is shorter than %d characters", _WEAK_KEY_CHARS)
