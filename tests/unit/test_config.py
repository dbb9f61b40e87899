"""Settings: defaults, env parsing, and the start-up refusals of unsafe or inconsistent values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("MIXINFER_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_documented_table():
    s = Settings()
    assert s.model_dir == Path("model_store")
    assert s.model_name == "mnist-mixup"
    assert s.model_version is None
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert (s.max_batch_images, s.max_mixes_per_call, s.max_queue_images) == (64, 1024, 1024)
    assert s.max_queue_delay_ms == 2.0 and s.max_queue_delay_s == pytest.approx(0.002)
    assert s.max_images_per_request == 256
    assert s.max_body_bytes == 16 * 1024 * 1024
    assert (s.max_pixels, s.max_pixels_per_request) == (16 * 1024 * 1024, 64 * 1024 * 1024)
    assert s.request_timeout_s == 10.0
    assert s.allow_mode_override is False and s.strict_size is False
    assert s.api_keys == () and s.admin_key is None and s.seed is None


def test_env_values_are_parsed(monkeypatch):
    monkeypatch.setenv("MIXINFER_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("MIXINFER_API_KEYS", "first-key, second-key")
    monkeypatch.setenv("MIXINFER_ADMIN_KEY", "the-admin-key")
    monkeypatch.setenv("MIXINFER_PORT", "9001")
    monkeypatch.setenv("MIXINFER_STRICT_SIZE", "true")
    s = Settings()
    assert s.providers == ("CPUExecutionProvider",)
    assert s.api_key_values() == (b"first-key", b"second-key")
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "the-admin-key"
    assert s.port == 9001 and s.strict_size is True


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MIXINFER_MAX_BATCH_IMAGES": "2048"}, "max_batch_images (2048) must be <= max_queue_images (1024)"),
        ({"MIXINFER_MAX_IMAGES_PER_REQUEST": "2000"}, "could never be queued"),
        ({"MIXINFER_MAX_PIXELS_PER_REQUEST": "1000000"}, "max_pixels (16777216) must be <= max_pixels_per_request"),
        ({"MIXINFER_MAX_PIXELS_PER_REQUEST": "0"}, "max_pixels_per_request"),
        ({"MIXINFER_API_KEYS": ""}, "api_keys is set but empty"),
        ({"MIXINFER_API_KEYS": "good,,other"}, "api_keys item 1 is empty"),
        ({"MIXINFER_API_KEYS": "good, "}, "api_keys item 1 is empty"),
        ({"MIXINFER_ADMIN_KEY": ""}, "admin_key is set but blank"),
        ({"MIXINFER_ADMIN_KEY": "   "}, "admin_key is set but blank"),
        ({"MIXINFER_ADMIN_KEY": "same", "MIXINFER_API_KEYS": "same"}, "admin_key must differ"),
        ({"MIXINFER_PORT": "0"}, "port"),
        ({"MIXINFER_MAX_BATCH_IMAGES": "0"}, "max_batch_images"),
        ({"MIXINFER_REQUEST_TIMEOUT_S": "0"}, "request_timeout_s"),
        ({"MIXINFER_MAX_QUEUE_DELAY_MS": "-1"}, "max_queue_delay_ms"),
        ({"MIXINFER_MODEL_VERSION": "../1"}, "model_version"),
        ({"MIXINFER_MODEL_NAME": "../etc"}, "model_name"),
        ({"MIXINFER_PROVIDERS": "CPUExecutionProvider,,"}, "providers"),
        ({"MIXINFER_MIXING": "gpu"}, "mixing"),
        ({"MIXINFER_RATE_LIMIT_PER_KEY": "0"}, "rate_limit_per_key"),
    ],
)
def test_unsafe_values_are_refused_at_start_up(monkeypatch, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert needle in str(info.value)


def test_refusal_messages_never_echo_a_key(monkeypatch):
    monkeypatch.setenv("MIXINFER_API_KEYS", "secret-value-123,,x")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "secret-value-123" not in str(info.value)


def test_keys_are_secret_in_repr(monkeypatch):
    monkeypatch.setenv("MIXINFER_API_KEYS", "hidden-api-key")
    monkeypatch.setenv("MIXINFER_ADMIN_KEY", "hidden-admin-key")
    text = repr(Settings())
    assert "hidden-api-key" not in text and "hidden-admin-key" not in text
