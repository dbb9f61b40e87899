"""Training building blocks: mixup arithmetic, augmentation, PGD, and bit-exact resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.training.datasets import load_dataset  # noqa: E402
from service.training.mixup import Augment, augment, mixup, pgd_linf, soft_cross_entropy  # noqa: E402
from service.training.models import build_model  # noqa: E402
from service.training.train import TrainConfig, Training, train  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: several times faster than two on a small CPU shared with other test runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mixup_blends_inputs_and_targets_with_the_same_per_sample_weight():
    b, k = 32, 32
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, 4, 4).clone()
    onehot = torch.eye(k)[:b]
    xm, tm = mixup(x, onehot, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(tm.sum(1), torch.ones(b))
    # image value i carries label i, so the target's expected label equals the blended pixel value
    assert torch.allclose((tm * torch.arange(k)).sum(1), xm[:, 0, 0, 0], atol=1e-4)
    lam = tm.max(1).values
    assert lam.min() < 0.7 and (tm > 0).sum(1).max() <= 2  # Beta(1,1) spreads; at most two sources per row


def test_soft_cross_entropy_equals_hard_cross_entropy_on_one_hot_targets():
    logits = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert torch.allclose(soft_cross_entropy(logits, torch.eye(5)[y]), torch.nn.functional.cross_entropy(logits, y))


def test_shift_augmentation_translates_by_at_most_pad_pixels_with_zero_fill():
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    out = augment(x, Augment.SHIFT, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.all(out.sum((1, 2, 3)) == 1.0)
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 28, pos % 28
    assert (rows - 14).abs().max() <= 2 and (cols - 14).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10


def test_pgd_stays_in_the_eps_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10, 1).eval()
    x = torch.rand(16, 1, 28, 28)
    y = model(x).argmax(1)
    adv = pgd_linf(model, x, y, eps=0.1, step=0.025, steps=5, gen=torch.Generator().manual_seed(1))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(adv), y) > ce(model(x), y)


@pytest.mark.parametrize("training", [Training.MIXUP, Training.IAT])
def test_resumed_run_equals_uninterrupted_run(tmp_path, training):
    ds = load_dataset("mnist5k")
    images, labels = ds.images[::40], ds.labels[::40]  # 125 images, every class
    cfg = TrainConfig(
        arch="mnist_cnn", training=training, epochs=2, milestones=(1,), batch_size=32, steps=2, eps=0.3, step=0.1
    )
    straight = train(cfg, images, labels, 10, run_dir=tmp_path / "a", progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["epoch-0001.safetensors", "epoch-0002.safetensors"]
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "epoch-0001.safetensors", tmp_path / "b")  # as if killed during epoch 2
    resumed = train(cfg, images, labels, 10, run_dir=tmp_path / "b", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [2]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(np.isfinite(h["loss"]) for h in straight.history)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    ds = load_dataset("mnist5k")
    images, labels = ds.images[::100], ds.labels[::100]
    cfg = TrainConfig(arch="mnist_cnn", epochs=1, milestones=(1,), batch_size=25)
    train(cfg, images, labels, 10, run_dir=tmp_path, progress=False)
    other = TrainConfig(arch="mnist_cnn", epochs=2, milestones=(1,), batch_size=25, lr=0.5)
    with pytest.raises(ValueError, match="was written by config"):
        train(other, images, labels, 10, run_dir=tmp_path, resume=True, progress=False)


def test_fresh_run_replaces_the_checkpoints_of_an_earlier_run(tmp_path):
    ds = load_dataset("mnist5k")
    images, labels = ds.images[::100], ds.labels[::100]
    long = TrainConfig(arch="mnist_cnn", epochs=3, milestones=(2,), batch_size=25)
    train(long, images, labels, 10, run_dir=tmp_path, progress=False)
    short = TrainConfig(arch="mnist_cnn", epochs=1, milestones=(1,), batch_size=25, lr=0.02)
    train(short, images, labels, 10, run_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0001.safetensors"]
