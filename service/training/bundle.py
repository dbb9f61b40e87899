"""Data to a finished, verified bundle: splits -> train -> export -> pool -> calibrate -> manifest last.

The bundle is built in a staging directory inside the store (``<store>/.staging-*/<name>/<version>``), finalized
and verified there with ``service.store.finalize_bundle``, and only then moved to ``<store>/<name>/<version>``;
an interrupted build never leaves a directory that looks like a bundle.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.manifest import SPLITS_FILE, Manifest
from service.mi.params import MIParams, MixSpec
from service.training.calibrate import DEFAULT_EVAL_SEED, DEFAULT_TARGET_FPR, EngineFactory, calibrate, split_accuracy
from service.training.datasets import DEFAULT_ARCH, Dataset, load_dataset, load_manifest_dataset
from service.training.export import export_bundle_model
from service.training.mixup import Augment
from service.training.pool import write_pool
from service.training.splits import Splits, make_splits
from service.training.train import TrainConfig, Training, default_milestones, train

LOGGER = logging.getLogger(__name__)


def default_train_config(dataset: str, training: Training, arch: str | None = None, **overrides: Any) -> TrainConfig:
    """The reference recipe (SPEC 8) for CIFAR; a CPU-sized one for the embedded MNIST subset.

    Unset (None) overrides keep the default; ``epochs`` without ``milestones`` rescales the schedule.
    """
    arch = arch or DEFAULT_ARCH.get(dataset, "resnet18")
    mnist_like = dataset == "mnist5k"
    if mnist_like:
        base: dict[str, Any] = {"epochs": 50, "lr": 0.01, "weight_decay": 0.0, "augment": Augment.SHIFT, "pad": 2}
        if training is Training.IAT:
            base.update(lr=0.05, eps=0.3, step=0.075, steps=10)
    else:
        base = {"epochs": 200, "lr": 0.01, "weight_decay": 0.0, "augment": Augment.FLIP_CROP, "pad": 4}
        if training is Training.IAT:
            base.update(lr=0.1, eps=8 / 255, step=2 / 255, steps=10)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if "milestones" not in overrides or overrides["milestones"] is None:
        base["milestones"] = default_milestones(int(base["epochs"]))
    return TrainConfig(arch=arch, training=training, **base)


def default_mi_params(training: Training) -> MIParams:
    """SPEC 4.4 defaults; stand-alone MI-OL uses lam 0.6 for IAT models, 0.5 for mixup models."""
    lam_ol = 0.6 if training is Training.IAT else 0.5
    return MIParams.model_validate({"ol_standalone": MixSpec(lam=lam_ol, n=30)})


@dataclass
class BundleRequest:
    """Everything ``mixinfer bundle`` needs (the CLI fills it from its flags)."""

    dataset: str = "mnist5k"
    name: str = "mnist-mixup"
    version: str = "1"
    store: Path = Path("model_store")
    data_dir: Path | None = None
    training: Training = Training.MIXUP
    config: TrainConfig | None = None
    seed: int = 0
    eval_seed: int = DEFAULT_EVAL_SEED
    threshold: float | None = None
    target_fpr: float = DEFAULT_TARGET_FPR
    force: bool = False
    run_dir: Path | None = None
    resume: bool = False
    device: str | None = None
    threads: int | None = 1  #: torch / ORT intra-op threads; 1 avoids spin-wait thrash on a shared small CPU
    progress: bool = True
    max_train_images: int | None = None  #: train on a prefix of the train split only (tests, smoke runs)
    description: str = ""
    command: str = "mixinfer bundle"
    checksums: dict[str, str] | None = None
    extra_recipe: dict[str, Any] = field(default_factory=dict)


def dataset_splits(ds: Dataset, seed: int) -> Splits:
    """The dataset's default split sizes, drawn with ``seed``."""
    return make_splits(
        ds.labels,
        ds.n_classes,
        seed=seed,
        test_size=ds.test_size,
        calibration_size=ds.calibration_size,
        pool_per_class=ds.pool_per_class,
        fixed_test=ds.fixed_test,
    )


def static_fields(ds: Dataset, splits: Splits, cfg: TrainConfig, req: BundleRequest) -> dict[str, Any]:
    """The manifest fields that do not come from measurement: identity, data, architecture, recipe."""
    from service import __version__

    training = cfg.recipe()
    training.update({"split_seed": req.seed, "dataset": ds.name})
    if req.max_train_images is not None:
        training["max_train_images"] = req.max_train_images
    training.update(req.extra_recipe)
    return {
        "name": req.name,
        "version": str(req.version),
        "description": req.description or f"{cfg.arch} trained with {cfg.training} on {ds.name}",
        "architecture": cfg.arch,
        "class_names": list(ds.class_names),
        "input": {"shape": list(ds.input_shape)},
        "dataset": {"name": ds.name, "sha256": ds.sha256, "n_images": int(ds.images.shape[0])},
        "splits": splits.sizes(),
        "recipe": {"command": req.command, "seed": cfg.seed, "mixinfer_version": __version__, "training": training},
    }


def finish_bundle(
    bundle_dir: Path,
    ds: Dataset,
    splits: Splits,
    *,
    fields: dict[str, Any],
    params: MIParams,
    eval_seed: int,
    threshold: float | None,
    target_fpr: float,
    threads: int | None = 1,
) -> Manifest:
    """Calibrate and measure through the exported model in ``bundle_dir``, then write the manifest last.

    Args:
        bundle_dir: holds model.onnx, pool.npz, splits.npz, weights.safetensors.
        ds, splits: the dataset and the bundle's splits (the pool is ``ds.images[splits.pool]``).
        fields: the static manifest fields (:func:`static_fields`).
        params: MI parameters; the threshold and its rule are replaced by the calibration.
        eval_seed: engine seed of the calibration and of the accuracies.
        threshold, target_fpr: fixed threshold, or the clean false-flag rate to calibrate to.
        threads: ONNX Runtime intra-op threads (None: ORT's default).
    """
    from service.store import finalize_bundle

    factory = EngineFactory(
        (bundle_dir / "model.onnx").read_bytes(),
        ds.images[splits.pool],
        ds.labels[splits.pool],
        n_classes=ds.n_classes,
        intra_op_threads=threads,
        input_name=fields["input"].get("name", "images"),
        output_name=fields["input"].get("output_name", "logits"),
    )
    params, calib = calibrate(
        factory, ds.images[splits.calibration], params, seed=eval_seed, threshold=threshold, target_fpr=target_fpr
    )
    acc = split_accuracy(factory, ds.images[splits.test], ds.labels[splits.test], params, seed=eval_seed)
    return finalize_bundle(bundle_dir, {**fields, "mi": params.model_dump(), "calibration": calib, "accuracy": acc})


def rule_of(mi: MIParams) -> tuple[float | None, float]:
    """(fixed threshold or None, target FPR) that recalibrate by a manifest's ``threshold_rule`` (``fixed=x`` or
    ``target_fpr=y``); with a fixed threshold the target is unused (the default)."""
    kind, _, value = mi.threshold_rule.partition("=")
    return (None, float(value)) if kind == "target_fpr" else (mi.threshold, DEFAULT_TARGET_FPR)


@contextmanager
def staged_bundle(store: Path, name: str, version: str) -> Iterator[Path]:
    """A staging directory ``<store>/.staging-*/<name>/<version>``; when the block finishes without an error it
    replaces ``<store>/<name>/<version>``, and the staging root is removed either way."""
    Path(store).mkdir(parents=True, exist_ok=True)
    stage_root = Path(tempfile.mkdtemp(prefix=".staging-", dir=store))
    final = Path(store) / name / str(version)
    try:
        staging = stage_root / name / str(version)
        staging.mkdir(parents=True)
        yield staging
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.replace(stage_root / "old")
        staging.replace(final)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)


def build_bundle(req: BundleRequest) -> Path:
    """Build ``<store>/<name>/<version>`` end to end; returns its path.

    Raises:
        FileExistsError: the bundle exists and ``force`` is not set.
    """
    final = Path(req.store) / req.name / str(req.version)
    if final.exists() and not req.force:
        raise FileExistsError(f"bundle {final} exists; pass --force to rebuild it")
    if req.threads:
        import torch

        torch.set_num_threads(req.threads)
    ds = load_dataset(req.dataset, req.data_dir, req.checksums)
    splits = dataset_splits(ds, req.seed)
    cfg = req.config or default_train_config(req.dataset, req.training, seed=req.seed)
    train_idx = splits.train if req.max_train_images is None else splits.train[: req.max_train_images]
    LOGGER.info("training %s (%s) on %d images: %s", cfg.arch, cfg.training, train_idx.size, cfg)
    result = train(
        cfg,
        ds.images[train_idx],
        ds.labels[train_idx],
        ds.n_classes,
        run_dir=req.run_dir,
        resume=req.resume,
        device=req.device,
        progress=req.progress,
        eval_set=(ds.images[splits.calibration], ds.labels[splits.calibration]),
    )
    with staged_bundle(req.store, req.name, req.version) as staging:
        export_bundle_model(result.model, staging, ds.input_shape, samples=ds.images[splits.calibration[:256]])
        write_pool(staging / "pool.npz", ds, splits)
        splits.save(staging / SPLITS_FILE)
        finish_bundle(
            staging,
            ds,
            splits,
            fields=static_fields(ds, splits, cfg, req),
            params=default_mi_params(cfg.training),
            eval_seed=req.eval_seed,
            threshold=req.threshold,
            target_fpr=req.target_fpr,
            threads=req.threads,
        )
    from service.store import load_bundle

    bundle = load_bundle(final, require_weights=True)
    LOGGER.info("bundle %s ready: %s", final, bundle.manifest.accuracy)
    return final


def recompute_numbers(bundle_dir: Path, data_dir: Path | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Recompute a finished bundle's recorded calibration and accuracies from its files and recorded seeds.

    Returns ``{"accuracy": {...}, "calibration": {...}, "threshold": float}`` in the manifest's shapes; with the
    same files, seeds and ONNX Runtime build they equal the manifest's values exactly.

    Raises:
        ValueError: the dataset on this machine is not the one the bundle was built from.
    """
    from service.store import load_bundle

    bundle = load_bundle(Path(bundle_dir), require_weights=False)
    m = bundle.manifest
    ds = load_manifest_dataset(m, data_dir)
    if ds.sha256 != m.dataset.sha256:
        raise ValueError(f"dataset {ds.name}: sha256 {ds.sha256}, the bundle was built from {m.dataset.sha256}")
    factory = EngineFactory(
        bundle.model_bytes,
        bundle.pool_images,
        bundle.pool_labels,
        n_classes=m.n_classes,
        intra_op_threads=threads,
        input_name=m.input.name,
        output_name=m.input.output_name,
    )
    split = bundle.splits
    fixed, target = rule_of(m.mi)
    params, calib = calibrate(
        factory, ds.images[split["calibration"]], m.mi, seed=m.calibration.seed, threshold=fixed, target_fpr=target
    )
    acc = split_accuracy(factory, ds.images[split["test"]], ds.labels[split["test"]], m.mi, seed=m.accuracy.seed)
    return {"accuracy": acc, "calibration": calib, "threshold": params.threshold}
