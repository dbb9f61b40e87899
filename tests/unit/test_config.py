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
        ({"MIXINFER_GRPC_PORT": "0"}, "grpc_port"),
        ({"MIXINFER_GRPC_PORT": "8000"}, "grpc_port (8000) must differ from port (8000)"),
        ({"MIXINFER_MAX_BATCH_IMAGES": "0"}, "max_batch_images"),
        ({"MIXINFER_REQUEST_TIMEOUT_S": "0"}, "request_timeout_s"),
        ({"MIXINFER_MAX_QUEUE_DELAY_MS": "-1"}, "max_queue_delay_ms"),
        ({"MIXINFER_MODEL_VERSION": "../1"}, "model_version"),
        ({"MIXINFER_MODEL_NAME": "../etc"}, "model_name"),
        ({"MIXINFER_PROVIDERS": "CPUExecutionProvider,,"}, "providers"),
        ({"MIXINFER_MIXING": "gpu"}, "mixing"),
        ({"MIXINFER_RATE_LIMIT_PER_KEY": "0"}, "rate_limit_per_key"),
        ({"MIXINFER_RESPONSE_DETAIL": "everything"}, "response_detail"),
        ({"MIXINFER_METRICS_PORT": "8000"}, "metrics_port (8000) must differ from port (8000)"),
        ({"MIXINFER_METRICS_KEY": " "}, "metrics_key is set but blank"),
        ({"MIXINFER_TRUSTED_PROXIES": "10.0.0.1,proxy.local"}, "got 'proxy.local'"),
        ({"MIXINFER_API_KEYS_FILE": "/nonexistent/keys"}, "api_keys_file '/nonexistent/keys' cannot be read"),
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


def test_new_defaults_keep_strangers_out():
    s = Settings()
    assert s.response_detail == "label" and s.trusted_proxies == ()
    assert s.metrics_port is None and s.metrics_key_value() is None
    assert s.api_keys_file is None and s.admin_key_file is None and s.admin_key_value() is None


def test_trusted_proxies_are_addresses_and_networks(monkeypatch):
    monkeypatch.setenv("MIXINFER_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7,::1")
    assert Settings().trusted_proxies == ("10.0.0.0/8", "192.168.1.7", "::1")
    monkeypatch.setenv("MIXINFER_TRUSTED_PROXIES", "")
    assert Settings().trusted_proxies == ()


def kubernetes_secret(root: Path, files: dict[str, str]) -> Path:
    """A Secret volume as the kubelet writes it: ``..<stamp>/<file>``, ``..data -> ..<stamp>``, ``<file> ->
    ..data/<file>`` (every visible name is a symlink to a symlinked directory)."""
    stamp = root / "..2026_12_06_21_00_00.123456789"
    stamp.mkdir(parents=True)
    for name, text in files.items():
        (stamp / name).write_text(text)
    (root / "..data").symlink_to(stamp.name)
    for name in files:
        (root / name).symlink_to(f"..data/{name}")
    return root


def test_key_files_follow_kubernetes_secret_links(monkeypatch, tmp_path):
    secret = kubernetes_secret(
        tmp_path / "secret", {"api-keys": "first-key\r\n\n  second-key \n", "admin": "adm-key\n"}
    )
    monkeypatch.setenv("MIXINFER_API_KEYS", "env-key")
    monkeypatch.setenv("MIXINFER_API_KEYS_FILE", str(secret / "api-keys"))
    monkeypatch.setenv("MIXINFER_ADMIN_KEY_FILE", str(secret / "admin"))
    s = Settings()
    assert s.api_key_values() == (b"env-key", b"first-key", b"second-key")
    assert s.admin_key_value() == b"adm-key"
    text = repr(s) + str(s.model_dump())
    assert "first-key" not in text and "adm-key" not in text
    # read at start-up: the same settings after a round trip (mixinfer serve re-validates with --host/--port)
    assert Settings.model_validate(s.model_dump()).api_key_values() == s.api_key_values()


@pytest.mark.parametrize(
    ("files", "env", "needle"),
    [
        ({"keys": "\n \n"}, {"MIXINFER_API_KEYS_FILE": "keys"}, "holds no key; expected one key per line"),
        (
            {"admin": "a-key\nb-key\n"},
            {"MIXINFER_ADMIN_KEY_FILE": "admin"},
            "admin_key_file holds 2 keys, expected exactly 1",
        ),
        ({"admin": "a-key"}, {"MIXINFER_ADMIN_KEY_FILE": "admin", "MIXINFER_ADMIN_KEY": "b-key"}, "both set"),
        (
            {"admin": "same-key", "keys": "same-key"},
            {"MIXINFER_ADMIN_KEY_FILE": "admin", "MIXINFER_API_KEYS_FILE": "keys"},
            "admin_key must differ",
        ),
        ({"keys": "\udcff"}, {"MIXINFER_API_KEYS_FILE": "keys"}, "cannot be read"),
    ],
)
def test_key_files_are_refused_when_unusable(monkeypatch, tmp_path, files, env, needle):
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / value) if key.endswith("_FILE") else value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert needle in str(info.value)
    assert "a-key" not in str(info.value) and "same-key" not in str(info.value)


def test_unknown_variables_name_the_closest_setting():
    from service.config import unknown_variables

    env = {
        "MIXINFER_API_KEY": "x",
        "MIXINFER_PORT": "1",
        "MIXINFER_HEALTH_URL": "http://x",
        "PATH": "/bin",
        "MIXINFER_RESPONSE_DETAILS": "full",
        "mixinfer_trusted_proxy": "1.2.3.4",
    }
    assert unknown_variables(env) == [
        "MIXINFER_API_KEY is not a mixinfer setting; did you mean MIXINFER_API_KEYS?",
        "MIXINFER_RESPONSE_DETAILS is not a mixinfer setting; did you mean MIXINFER_RESPONSE_DETAIL?",
        "mixinfer_trusted_proxy is not a mixinfer setting; did you mean MIXINFER_TRUSTED_PROXIES?",
    ]
    assert unknown_variables({"MIXINFER_QQQ": "1"})[0].startswith("MIXINFER_QQQ is not a mixinfer setting; known: ")
