"""Fixtures of the robustness tests: a small real MNIST bundle (mnist_cnn, trained briefly) built once per session.

The bundle is a real ``mnist5k`` bundle (real data, real splits, real ONNX export of the torch network, real pool),
so the evaluation can load its test split and ``load_bundle_model`` can rebuild the torch twin. Training is short
(plain cross-entropy, 1 epoch on 1,000 images, a few seconds): accurate enough for attacks to have something to
break (~90 % clean), not a model to report numbers for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tinybundle import bundle_mi_fields, placeholder_calibration_fields


def build_mnist_bundle(store: Path, *, name: str = "mnist-test", seed: int = 0, epochs: int = 1) -> Path:
    """Train, export and finalize a small mnist_cnn bundle at ``store/name/1``."""
    import torch

    from service.manifest import MODEL_FILE, POOL_FILE, SPLITS_FILE, WEIGHTS_FILE
    from service.store import finalize_bundle
    from service.training.datasets import load_dataset
    from service.training.models import build_model, save_weights

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ds = load_dataset("mnist5k")
    order = rng.permutation(ds.images.shape[0]).astype(np.int64)
    test, cal, train = np.sort(order[:300]), np.sort(order[300:400]), np.sort(order[400:1400])
    train_labels = ds.labels[train]
    pool = np.sort(np.concatenate([train[train_labels == k][:10] for k in range(10)]))
    pool = pool[np.argsort(ds.labels[pool], kind="stable")]

    model = build_model("mnist_cnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xs = torch.from_numpy(ds.images[train]).float() / 255.0
    ys = torch.from_numpy(ds.labels[train])
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(xs.shape[0])
        for i in range(0, xs.shape[0], 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[b]), ys[b]).backward()
            opt.step()
    model.eval()

    bundle_dir = store / name / "1"
    bundle_dir.mkdir(parents=True)
    torch.onnx.export(
        model,
        (torch.rand(2, 1, 28, 28),),
        str(bundle_dir / MODEL_FILE),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    save_weights(model, bundle_dir / WEIGHTS_FILE)
    np.savez(bundle_dir / POOL_FILE, images=ds.images[pool], labels=ds.labels[pool].astype(np.int64))
    np.savez(bundle_dir / SPLITS_FILE, train=train, pool=np.sort(pool), calibration=cal, test=test)
    finalize_bundle(
        bundle_dir,
        {
            "description": "robustness test bundle",
            "created": "2026-01-01T00:00:00Z",
            "architecture": "mnist_cnn",
            "class_names": [str(k) for k in range(10)],
            "input": {"name": "images", "shape": [1, 28, 28], "output_name": "logits"},
            "dataset": {"name": "mnist5k", "sha256": ds.sha256, "n_images": int(ds.images.shape[0])},
            "mi": bundle_mi_fields(),
            "splits": {"train": train.size, "pool": pool.size, "calibration": cal.size, "test": test.size},
            "calibration": placeholder_calibration_fields(cal.size, seed),
            "accuracy": {"split": "test", "n_images": test.size, "seed": seed, "plain": 0.9, "mi_combined": 0.9},
            "recipe": {"command": "tests/robustness/conftest.py", "seed": seed, "mixinfer_version": "0.1.0"},
        },
    )
    return bundle_dir


@pytest.fixture(scope="session")
def mnist_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified, briefly trained mnist_cnn bundle (built once per test session; do not modify)."""
    return build_mnist_bundle(tmp_path_factory.mktemp("robust-store"))


@pytest.fixture(scope="session")
def mnist_bundle(mnist_bundle_dir: Path):
    from service.store import load_bundle

    return load_bundle(mnist_bundle_dir, require_weights=True)
