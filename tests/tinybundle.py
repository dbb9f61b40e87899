"""A tiny but real model bundle for tests: an ONNX CNN built with ``onnx.helper``, a real pool, disjoint splits.

The network (architecture name ``tiny_cnn``) is, in torch terms::

    x -> (x - 0.5) / 0.5 -> Conv2d(C, 4, 3, padding=1) -> ReLU -> Flatten -> Linear(4*H*W, K)

with seeded random weights, input ``images`` float32 (B, C, H, W) in [0, 1] (dynamic batch axis) and output
``logits`` (B, K). ``weights.safetensors`` holds the same weights under the names a torch
``Classifier(body=nn.Sequential(conv, relu, flatten, linear))`` would use: ``body.0.weight``, ``body.0.bias``,
``body.3.weight``, ``body.3.bias``. The bundle is finished with :func:`service.store.finalize_bundle`, so it
passes every check of :func:`service.store.load_bundle`.

Example::

    bundle_dir = make_tiny_bundle(tmp_path, n_classes=4, mi={"threshold": 0.1})
    bundle = load_bundle(bundle_dir)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.manifest import MANIFEST_FILE, MODEL_FILE, POOL_FILE, SPLITS_FILE, WEIGHTS_FILE
from service.store import finalize_bundle, sha256_file

TINY_ARCH = "tiny_cnn"
TINY_CHANNELS = 4
OPSET = 17


def tiny_weights(n_classes: int, shape: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded weights of the tiny CNN, keyed by their torch state-dict names."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    return {
        "body.0.weight": (rng.normal(0.0, 0.6, size=(TINY_CHANNELS, c, 3, 3))).astype(np.float32),
        "body.0.bias": (rng.normal(0.0, 0.1, size=(TINY_CHANNELS,))).astype(np.float32),
        "body.3.weight": (
            rng.normal(0.0, 1.5 / np.sqrt(TINY_CHANNELS * h * w), size=(n_classes, TINY_CHANNELS * h * w))
        ).astype(np.float32),
        "body.3.bias": (rng.normal(0.0, 0.1, size=(n_classes,))).astype(np.float32),
    }


def tiny_onnx_model(weights: dict[str, np.ndarray], shape: tuple[int, int, int], n_classes: int) -> onnx.ModelProto:
    """The tiny CNN as an ONNX model (opset 17), normalisation inside the graph, dynamic batch axis."""
    c, h, w = shape
    inits = [
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "norm_mean"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "norm_std"),
        numpy_helper.from_array(weights["body.0.weight"], "conv_w"),
        numpy_helper.from_array(weights["body.0.bias"], "conv_b"),
        numpy_helper.from_array(weights["body.3.weight"], "fc_w"),
        numpy_helper.from_array(weights["body.3.bias"], "fc_b"),
    ]
    nodes = [
        helper.make_node("Sub", ["images", "norm_mean"], ["centered"]),
        helper.make_node("Div", ["centered", "norm_std"], ["normed"]),
        helper.make_node("Conv", ["normed", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests.tinybundle")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def bundle_mi_fields() -> dict[str, Any]:
    """The manifest ``mi`` section of the test bundles: fixed threshold 0.2, paper-like lambdas and N."""
    return {
        "lam_pl": 0.5,
        "n_pl": 5,
        "threshold": 0.2,
        "threshold_rule": "fixed=0.2",
        "ol_combined": {"lam": 0.4, "n": 15},
        "ol_standalone": {"lam": 0.5, "n": 30},
    }


def placeholder_calibration_fields(n_cal: int, seed: int) -> dict[str, Any]:
    """A placeholder manifest ``calibration`` section (fixed quantiles) for a calibration split of ``n_cal``."""
    return {
        "split": "calibration",
        "n_images": n_cal,
        "seed": seed,
        "gap_quantiles": {"0.05": 0.0, "0.5": 0.05, "0.95": 0.2},
        "false_flag_rate": 0.05,
    }


def make_tiny_bundle(
    directory: Path,
    *,
    name: str = "tiny",
    version: str = "1",
    n_classes: int = 4,
    shape: tuple[int, int, int] = (1, 8, 8),
    pool_per_class: int = 6,
    seed: int = 0,
    **manifest_overrides: Any,
) -> Path:
    """Build ``directory/name/version`` as a complete, verified bundle and return its path.

    Args:
        directory: the store root (the bundle goes to ``directory/name/version``).
        name: model name (also the manifest name).
        version: model version (also the manifest version).
        n_classes: K >= 2.
        shape: (C, H, W) of one image.
        pool_per_class: pool images per class (the pool is label-sorted uint8 noise with a class-wise brightness
            offset, so classes differ).
        seed: seeds weights, pool and splits.
        **manifest_overrides: manifest fields to replace; dict values are merged one level deep, e.g.
            ``mi={"threshold": 0.1}`` or ``calibration={"false_flag_rate": 0.2}``.

    Returns:
        The bundle directory.
    """
    bundle_dir = Path(directory) / name / version
    bundle_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    weights = tiny_weights(n_classes, shape, seed)
    onnx.save_model(tiny_onnx_model(weights, shape, n_classes), str(bundle_dir / MODEL_FILE))
    from safetensors.numpy import save_file

    save_file(weights, str(bundle_dir / WEIGHTS_FILE))

    n_pool = n_classes * pool_per_class
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), pool_per_class)
    base = (labels * (200 // n_classes)).astype(np.int64)[:, None, None, None]
    noise = rng.integers(0, 56, size=(n_pool, *shape))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    np.savez(bundle_dir / POOL_FILE, images=images, labels=labels)

    n_train = n_pool + 10
    n_cal, n_test = 10, 10
    n_images = n_train + n_cal + n_test
    order = rng.permutation(n_images).astype(np.int64)
    train = np.sort(order[:n_train])
    splits = {
        "train": train,
        "pool": train[:n_pool].copy(),
        "calibration": np.sort(order[n_train : n_train + n_cal]),
        "test": np.sort(order[n_train + n_cal :]),
    }
    np.savez(bundle_dir / SPLITS_FILE, **splits)

    fields: dict[str, Any] = {
        "description": "tiny test bundle",
        "architecture": TINY_ARCH,
        "class_names": [f"class{k}" for k in range(n_classes)],
        "input": {"name": "images", "shape": list(shape), "output_name": "logits"},
        "dataset": {
            "name": "synthetic",
            "sha256": hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest(),
            "n_images": n_images,
        },
        "mi": bundle_mi_fields(),
        "splits": {"train": n_train, "pool": n_pool, "calibration": n_cal, "test": n_test},
        "calibration": placeholder_calibration_fields(n_cal, seed),
        "accuracy": {"split": "test", "n_images": n_test, "seed": seed, "plain": 0.5, "mi_combined": 0.5},
        "recipe": {"command": "tests.tinybundle.make_tiny_bundle", "seed": seed, "mixinfer_version": "0.1.0"},
    }
    finalize_bundle(bundle_dir, _deep_update(fields, manifest_overrides))
    return bundle_dir


def rehash(bundle_dir: Path, **manifest_overrides: Any) -> None:
    """Rewrite a bundle's manifest with fresh file hashes and optional overrides, WITHOUT verifying it.

    For tests that build deliberately broken bundles: break a file, ``rehash`` so the hashes match again, then
    check that ``load_bundle`` refuses it for the intended reason.
    """
    mpath = Path(bundle_dir) / MANIFEST_FILE
    data = json.loads(mpath.read_text(encoding="utf-8"))
    data["files"] = {
        p.name: sha256_file(p) for p in sorted(Path(bundle_dir).iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }
    data = _deep_update(data, manifest_overrides)
    mpath.write_text(json.dumps(data, indent=2), encoding="utf-8")
