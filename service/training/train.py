"""Mixup training and interpolated adversarial training (SPEC section 8), resumable at every epoch.

Checkpoints are ``runs/<run>/epoch-NNNN.safetensors`` holding the model state, the SGD momentum buffers and,
as safetensors metadata, the epoch, step and the training config (no pickle). Data-side randomness of epoch e
comes from a generator seeded with (seed, e), so a resumed run continues bit-for-bit like an uninterrupted one
(on the same device and torch build).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from service.training.mixup import Augment, augment, mixup, pgd_linf, soft_cross_entropy
from service.training.models import Classifier, build_model

LOGGER = logging.getLogger(__name__)
CHECKPOINT_GLOB = "epoch-*.safetensors"
KEEP_CHECKPOINTS = 3


class Training(StrEnum):
    """Training objective."""

    MIXUP = "mixup"  #: mixup (Zhang et al. 2018) as in the reference's train_resnet_mixup.py
    IAT = "iat"  #: interpolated adversarial training (Lamb et al. 2019), reference settings


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a run (recorded in checkpoints and in the bundle's recipe).

    Attributes:
        arch: registry name of the network.
        training: mixup or iat.
        epochs: total epochs; milestones: epochs after which lr is multiplied by ``gamma``.
        batch_size, lr, momentum, weight_decay: SGD settings (reference: 64, 0.01 (IAT 0.1), 0.9, 0).
        alpha: Beta(alpha, alpha) of mixup.
        augment, pad: training augmentation and its shift/padding in pixels.
        adv_ratio: IAT share of each batch made adversarial; eps, step, steps: its PGD ([0, 1] units).
        seed: seed of the weight init and of every data-side draw.
    """

    arch: str
    training: Training = Training.MIXUP
    epochs: int = 50
    milestones: tuple[int, ...] = (25, 38)
    gamma: float = 0.1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha: float = 1.0
    augment: Augment = Augment.SHIFT
    pad: int = 2
    adv_ratio: float = 0.5
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["training"], d["augment"], d["milestones"] = str(self.training), str(self.augment), list(self.milestones)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["training"], d["augment"] = Training(d["training"]), Augment(d["augment"])
        d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def recipe(self) -> dict[str, float | int | str | bool]:
        """Flat hyper-parameters for the manifest's ``recipe.training``."""
        d = self.to_json()
        d["milestones"] = ",".join(str(m) for m in self.milestones)
        return d


def default_milestones(epochs: int) -> tuple[int, ...]:
    """The reference schedule (x0.1 at 100 and 150 of 200 epochs) scaled to ``epochs``."""
    return tuple(sorted({max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))}))


@dataclass
class TrainResult:
    """The trained model (eval mode) and per-epoch history."""

    model: Classifier
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``."""
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


def to_float(images: NDArray[np.uint8]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1] (the scaling the server and the pool use)."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).float() / 255.0


@torch.no_grad()
def accuracy(model: nn.Module, images: NDArray[np.uint8], labels: NDArray[np.int64], batch: int = 500) -> float:
    """Plain top-1 accuracy in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(labels), batch):
        pred = model(to_float(images[i : i + batch]).to(device)).argmax(1).cpu().numpy()
        hits += int((pred == labels[i : i + batch]).sum())
    return hits / max(1, len(labels))


def _step_batch(
    model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, *, n_classes: int, gen: torch.Generator
) -> torch.Tensor:
    """Loss of one batch (mixup, or IAT: mixup inside the adversarial part and inside the clean part)."""
    onehot = torch.nn.functional.one_hot(y, n_classes).float()
    if cfg.training is Training.MIXUP:
        model.train()
        xm, tm = mixup(x, onehot, cfg.alpha, gen)
        return soft_cross_entropy(model(xm), tm)
    n_adv = round(cfg.adv_ratio * x.shape[0])
    model.eval()
    with torch.no_grad():
        pred = model(x[:n_adv]).argmax(1)
    x_adv = pgd_linf(model, x[:n_adv], pred, eps=cfg.eps, step=cfg.step, steps=cfg.steps, gen=gen)
    xa, ta = mixup(x_adv, onehot[:n_adv], cfg.alpha, gen)
    xc, tc = mixup(x[n_adv:], onehot[n_adv:], cfg.alpha, gen)
    model.train()
    logits = model(torch.cat([xa, xc]))
    return cfg.adv_ratio * soft_cross_entropy(logits[:n_adv], ta) + (1 - cfg.adv_ratio) * soft_cross_entropy(
        logits[n_adv:], tc
    )


def _save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.SGD, cfg: TrainConfig, epoch: int) -> Path:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{name}"] = buf.detach().cpu().contiguous()
    path = run_dir / f"epoch-{epoch:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"epoch": str(epoch), "config": json.dumps(cfg.to_json(), sort_keys=True)})
    tmp.replace(path)
    for old in sorted(run_dir.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob(CHECKPOINT_GLOB)) if run_dir.is_dir() else []
    return found[-1] if found else None


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.SGD, cfg: TrainConfig) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    saved = TrainConfig.from_json(json.loads(meta["config"]))
    if saved != cfg:
        raise ValueError(f"checkpoint {path} was written by config {saved}, not the requested {cfg}")
    tensors = load_file(str(path))
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    for name, p in model.named_parameters():
        if f"momentum.{name}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{name}"].to(device)
    return int(meta["epoch"])


def train(
    cfg: TrainConfig,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64],
    n_classes: int,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    eval_set: tuple[NDArray[np.uint8], NDArray[np.int64]] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on the given training images.

    Args:
        cfg: the run's hyper-parameters.
        images, labels: the training split, uint8 (N, C, H, W) and int64 (N,).
        n_classes: number of classes.
        run_dir: where per-epoch checkpoints go (None: no checkpoints).
        resume: continue from the latest checkpoint in ``run_dir`` (its config must equal ``cfg``).
        device: torch device; default CUDA when present, else CPU.
        progress: show a tqdm bar per epoch.
        eval_set: optional held-out images and labels whose plain accuracy is logged each epoch.

    Returns:
        The trained model in eval mode and the per-epoch history (loss, train accuracy on the mixed targets'
        argmax is not meaningful, so the held-out accuracy is logged when ``eval_set`` is given).
    """
    from tqdm import tqdm

    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, n_classes, images.shape[1]).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start = 0
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(run_dir) if resume else None
        if ckpt is not None:
            start = _load_checkpoint(ckpt, model, opt, cfg)
            LOGGER.info("resuming %s after epoch %d", run_dir, start)
        elif not resume:
            stale = sorted(run_dir.glob(CHECKPOINT_GLOB))
            if stale:  # a fresh run must not keep (or later prefer) an older run's checkpoints
                LOGGER.info("fresh run: removing %d checkpoints of an earlier run in %s", len(stale), run_dir)
                for old in stale:
                    old.unlink()
    x_all = to_float(images)
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64, copy=True))
    n = x_all.shape[0]
    n_batches = math.ceil(n / cfg.batch_size)
    result = TrainResult(model=model)
    for epoch in range(start, cfg.epochs):
        gen = _epoch_generator(cfg.seed, epoch)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, epoch)
        order = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i in bar:
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = augment(x_all[idx], cfg.augment, cfg.pad, gen).to(dev)
            loss = _step_batch(model, cfg, x, y_all[idx].to(dev), n_classes=n_classes, gen=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (i + 1):.4f}")
        record = {"epoch": epoch + 1, "loss": total / n_batches, "lr": _lr_at(cfg, epoch)}
        record["seconds"] = time.perf_counter() - t0
        if eval_set is not None:
            record["heldout_acc"] = accuracy(model, *eval_set)
        result.history.append(record)
        LOGGER.info("epoch %s", " ".join(f"{k}={v:.4g}" for k, v in record.items()))
        if run_dir is not None:
            result.checkpoint = _save_checkpoint(run_dir, model, opt, cfg, epoch + 1)
    model.eval()
    return result
