"""``mixinfer import``: check the user's model, wrap it in the server's convention, prove parity, split the
user's images, calibrate and measure through the real engine, and write a bundle with the same contract as
``mixinfer bundle`` (staged inside the store, manifest last, verified, then moved into place).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.importing.adapter import Adapters, BatchMode, build_served_model, resolve_adapters, served_names
from service.importing.data import import_dataset, import_splits, read_class_names
from service.importing.graph import Source, inspect_source, scores_count
from service.importing.options import (
    MI_LOSS_WARNING,
    NEAR_CHANCE_SHARE,
    TRAINING_DATA_UNKNOWN,
    ImportOptions,
    ImportRefusedError,
)
from service.importing.parity import Parity, as_probs, check_parity, original_outputs, served_probs
from service.manifest import MODEL_FILE, POOL_FILE, SPLITS_FILE, Manifest
from service.mi.params import MIParams
from service.training.datasets import Dataset
from service.training.splits import Splits

LOGGER = logging.getLogger(__name__)

#: user images compared between the original and the served graph
PARITY_IMAGES = 64
BATCH_LOG = {
    "symbolic": "the model's batch axis is symbolic: served as it is",
    "dynamic": "the model's fixed batch of 1 was made symbolic (parity holds at batch 1 and above)",
    "scan": "the model breaks at batches above 1 (hard-coded shapes, e.g. a Reshape to [1, -1]): it runs one "
    "image at a time inside an ONNX Scan over the batch (correct, slower)",
}


def _n_outputs(src: Source, served: bytes, a: Adapters) -> int:
    k = scores_count(src.output_dims)
    if k is not None and k > 0:
        return k
    return int(served_probs(served, np.zeros((1, *a.shape), np.uint8), 1).shape[1])


def _check_images(ds: Dataset, a: Adapters) -> None:
    if ds.input_shape != a.shape:
        raise ImportRefusedError(
            f"images: expected (C, H, W) = {a.shape} as the model takes them, got {ds.input_shape} from the data"
        )


def _served_graph(src: Source, a: Adapters, images: NDArray[np.uint8], tol: float) -> tuple[bytes, BatchMode, Parity]:
    """The served graph whose parity with the original holds at batch 1 and batched, and its batch mode."""
    reference = as_probs(original_outputs(src, a, images), a.output)
    modes: tuple[BatchMode, ...] = ("symbolic" if isinstance(src.input_dims[0], str) else "dynamic", "scan")
    tried = []
    for mode in modes:
        served = build_served_model(src, a, mode).SerializeToString()
        parity = check_parity(src, a, served, images, reference)
        LOGGER.info(
            "parity (%s batch) on %d images: max |dp| %.3g at batch 1, %.3g at batch %d%s",
            mode,
            parity.n_images,
            parity.max_dp_batch1,
            parity.max_dp_batched,
            parity.batch,
            f" ({parity.error})" if parity.error else "",
        )
        if parity.worst <= tol:
            LOGGER.info("batch: %s", BATCH_LOG[mode])
            return served, mode, parity
        tried.append(
            f"{mode}: {parity.max_dp_batch1:.3g} at batch 1, {parity.max_dp_batched:.3g} at batch {parity.batch}"
        )
    raise ImportRefusedError(f"parity with the original model: expected max |dp| <= {tol:g}, got {'; '.join(tried)}")


def _plain_accuracy(served: bytes, ds: Dataset, idx: NDArray[np.int64]) -> float:
    probs = served_probs(served, ds.images[idx], 64)
    return float(np.mean(probs.argmax(1) == ds.labels[idx]))


def _check_not_chance(acc: float, n: int, k: int, class_names_given: bool) -> None:
    chance = 1.0 / k
    floor = chance + NEAR_CHANCE_SHARE * (1.0 - chance)
    if acc < floor:
        hint = (
            "check the adapters (--input-layout, --pixel-range, --mean/--std, --output)"
            if class_names_given
            else "the class order of the folders is probably not the model's: pass --class-names FILE in the "
            "model's output order"
        )
        raise ImportRefusedError(
            f"plain accuracy on {n} of the user's images: expected well above chance {chance:.3f} (>= {floor:.3f}), "
            f"got {acc:.3f}; {hint}"
        )


def _twin_info(served: bytes, pool: NDArray[np.uint8]) -> dict[str, Any]:
    try:
        from service.importing.twin import TwinUnavailableError, check_twin, convert_served
    except ModuleNotFoundError as exc:  # the eval/train extras are not installed: serving still works
        return {"converted": False, "reason": f"module {exc.name!r} missing (install the 'eval' extra)"}
    try:
        check = check_twin(convert_served(served), served, pool[:: max(1, len(pool) // 16)])
    except TwinUnavailableError as exc:
        LOGGER.warning("no differentiable twin: %s; `mixinfer evaluate` will run the black-box attacks only", exc)
        return {"converted": False, "reason": str(exc)}
    LOGGER.info("twin: onnx2torch, max |dp| %.2e against the served graph", check.max_dp)
    return {"converted": True, "max_dp": check.max_dp, "zero_gradient_images": check.zero_gradient_images}


def _warn_mi_cost(acc: dict[str, Any]) -> None:
    for key, label in (("mi_pl", "MI-PL"), ("mi_ol", "MI-OL"), ("mi_combined", "MI-Combined")):
        value = acc.get(key)
        if value is not None and acc["plain"] - value > MI_LOSS_WARNING:
            LOGGER.warning(
                "%s costs %.1f points of clean accuracy against the plain model (%.1f%% vs %.1f%%): MI assumes a "
                "mixup-trained model (an ordinary one pays more); consider --lam-pl/--lam-ol closer to 1",
                label,
                100 * (acc["plain"] - value),
                100 * value,
                100 * acc["plain"],
            )


def _fields(
    opts: ImportOptions, *, src: Source, a: Adapters, ds: Dataset, splits: Splits, info: dict[str, Any]
) -> dict[str, Any]:
    from service import __version__

    in_name, out_name = served_names(src)
    return {
        "name": opts.name,
        "version": str(opts.version),
        "description": opts.description or f"{opts.onnx_path.name} imported with mixinfer import",
        "architecture": "onnx-import",
        "class_names": list(ds.class_names),
        "input": {"name": in_name, "shape": list(a.shape), "output_name": out_name},
        "dataset": {"name": ds.name, "sha256": ds.sha256, "n_images": int(ds.images.shape[0])},
        "splits": splits.sizes(),
        "recipe": {
            "command": opts.command,
            "seed": opts.seed,
            "mixinfer_version": __version__,
            "training": {"imported": True, "split_seed": opts.seed, "dataset": ds.name},
        },
        "imported": info,
    }


def run_import(opts: ImportOptions) -> Path:
    """Import ``opts.onnx_path`` into ``<store>/<name>/<version>``; returns the bundle path.

    Raises:
        ImportRefusedError: anything the model, the options or the data do not allow (one line: what, expected, got).
    """
    final = Path(opts.store) / opts.name / str(opts.version)
    if final.exists() and not opts.force:
        raise ImportRefusedError(f"bundle {final}: expected a new name/version or --force, got an existing bundle")
    src = inspect_source(opts.onnx_path, opts.input_name, opts.output_name)
    a = resolve_adapters(src, opts)
    names = read_class_names(opts.class_names_file) if opts.class_names_file else None
    ds = import_dataset(opts.dataset, opts.data_dir, names, opts.test_dir, a.shape[0])
    _check_images(ds, a)
    splits = import_splits(ds, opts.seed)
    rng = np.random.default_rng(opts.seed)
    parity_idx = np.sort(rng.permutation(ds.labels.size)[:PARITY_IMAGES])
    served, batch, parity = _served_graph(src, a, ds.images[parity_idx], opts.parity_tol)
    k = _n_outputs(src, served, a)
    if k != ds.n_classes:
        raise ImportRefusedError(
            f"classes: expected {k} (the model's outputs), got {ds.n_classes} in the data {list(ds.class_names)}"
        )
    held = np.concatenate([splits.calibration, splits.test])
    acc = _plain_accuracy(served, ds, held)
    LOGGER.info("plain accuracy on %d calibration and test images: %.4f", held.size, acc)
    _check_not_chance(acc, held.size, k, names is not None)
    params = MIParams.model_validate(opts.mi)
    info = {
        "source_file": opts.onnx_path.name,
        "source_sha256": src.sha256,
        "source_input": src.input_name,
        "source_output": src.output_name,
        "opset": src.opset,
        "input_layout": a.layout,
        "pixel_range": a.pixel_range,
        "mean": a.mean,
        "std": a.std,
        "input_type": a.input_type,
        "output": a.output,
        "batch": batch,
        "class_names_from": "file" if names else "data",
        "parity": {
            "n_images": parity.n_images,
            "batch": parity.batch,
            "max_dp_batch1": parity.max_dp_batch1,
            "max_dp_batched": parity.max_dp_batched,
            "tol": opts.parity_tol,
        },
        "twin": _twin_info(served, ds.images[splits.pool]),
        "training_data": (
            "test split from --test-dir, which the user asserts the model never trained on"
            if opts.test_dir
            else TRAINING_DATA_UNKNOWN
        ),
        "test_dir": str(Path(opts.test_dir).resolve()) if opts.test_dir else None,
    }
    if not opts.test_dir:
        LOGGER.warning("%s", TRAINING_DATA_UNKNOWN)
    manifest = _write_bundle(
        opts,
        served=served,
        ds=ds,
        splits=splits,
        params=params,
        fields=_fields(opts, src=src, a=a, ds=ds, splits=splits, info=info),
    )
    _warn_mi_cost(manifest.accuracy.model_dump())
    return final


def _write_bundle(
    opts: ImportOptions,
    *,
    served: bytes,
    ds: Dataset,
    splits: Splits,
    params: MIParams,
    fields: dict[str, Any],
) -> Manifest:
    from service.training.bundle import finish_bundle, staged_bundle
    from service.training.pool import write_pool

    with staged_bundle(opts.store, opts.name, str(opts.version)) as staging:
        (staging / MODEL_FILE).write_bytes(served)
        write_pool(staging / POOL_FILE, ds, splits)
        splits.save(staging / SPLITS_FILE)
        manifest = finish_bundle(
            staging,
            ds,
            splits,
            fields=fields,
            params=params,
            eval_seed=opts.eval_seed,
            threshold=opts.threshold,
            target_fpr=opts.target_fpr,
            threads=opts.threads,
        )
    LOGGER.info("imported bundle %s/%s ready: %s", opts.name, opts.version, manifest.accuracy)
    return manifest
