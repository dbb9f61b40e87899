"""The evaluation's torch twin on CUDA (``mixinfer evaluate --device cuda``): same outputs as the served engine for the
same partners, same gradients as on the CPU, and attacks that stay on the device and inside the eps-ball."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.backends.providers import CPU  # noqa: E402
from service.mi.engine import MIEngine  # noqa: E402
from service.mi.params import Mode  # noqa: E402
from service.robustness.attacks.core import quantize  # noqa: E402
from service.robustness.attacks.eot_combined import eot_pgd_combined  # noqa: E402
from service.robustness.baselines import BASELINES, predict_baseline  # noqa: E402
from service.robustness.data import load_split  # noqa: E402
from service.robustness.pipeline import DifferentiableMI  # noqa: E402
from service.store import load_bundle, open_backend  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA"),
]

BUNDLE = Path(__file__).resolve().parents[2] / "model_store" / "mnist-mixup" / "1"
#: cuDNN may use TF32 and other reduction orders: probabilities agree to a few 1e-4, not bit for bit
ATOL = 2e-3


@pytest.fixture(scope="module")
def bundle():  # type: ignore[no-untyped-def]
    return load_bundle(BUNDLE, require_weights=True)


def test_cuda_twin_matches_the_served_engine_on_the_same_partners(bundle) -> None:  # type: ignore[no-untyped-def]
    twin = DifferentiableMI.from_bundle(bundle, device="cuda")
    assert twin.pool_x.is_cuda and next(twin.model.parameters()).is_cuda
    engine = MIEngine(open_backend(bundle, providers=[CPU]), bundle.pool_labels, bundle.manifest.mi)
    x, _, _ = load_split(bundle, "test", 64)
    res = engine(x, Mode.COMBINED, rng=np.random.default_rng(0), return_partners=True)
    ol = np.where(res.partners.ol < 0, 0, res.partners.ol)[None]
    out = twin(torch.from_numpy(x).cuda(), Mode.COMBINED, pl_partners=res.partners.pl[None], ol_partners=ol)
    np.testing.assert_allclose(out.gap[0].cpu().numpy(), res.gap, atol=ATOL)
    near = np.abs(res.gap - bundle.manifest.mi.threshold) < ATOL
    same = out.flagged[0].cpu().numpy() == res.flagged
    assert same[~near].all()
    np.testing.assert_allclose(out.probs[0].cpu().numpy()[same], res.probs[same], atol=ATOL)


def test_cuda_gradient_matches_the_cpu_gradient_for_the_same_draws(bundle) -> None:  # type: ignore[no-untyped-def]
    x_np, y_np, _ = load_split(bundle, "test", 16)
    grads = []
    for device in ("cpu", "cuda"):
        twin = DifferentiableMI.from_bundle(bundle, device=device)
        y_hat = twin.clean_probs(torch.from_numpy(x_np).to(device)).argmax(1).cpu().numpy()
        pl = twin.draw(y_hat, twin.params.n_pl, 4, True, np.random.default_rng(1))
        x = torch.from_numpy(x_np).to(device).requires_grad_(True)
        probs = twin(x, Mode.PL, pl_partners=pl).probs
        loss = -torch.log(probs.gather(2, torch.from_numpy(y_np).to(device).view(1, -1, 1).expand(4, -1, 1))).sum()
        (g,) = torch.autograd.grad(loss, x)
        grads.append(g.flatten(1).cpu())
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1)
    assert cos.min() > 0.99, cos


def test_eot_attack_and_baselines_run_on_the_device_within_eps(bundle) -> None:  # type: ignore[no-untyped-def]
    twin = DifferentiableMI.from_bundle(bundle, device="cuda")
    x_np, y_np, _ = load_split(bundle, "test", 32)
    x, y = torch.from_numpy(x_np).cuda(), torch.from_numpy(y_np).cuda()
    x_adv = eot_pgd_combined(twin, x, y, eps=0.3, step=0.05, steps=10, eot=4, gen=np.random.default_rng(2))
    assert x_adv.is_cuda
    q = quantize(x_adv, x, 0.3).cpu()
    assert (q - torch.from_numpy(x_np)).abs().max() <= 0.3 + 1e-6 and q.min() >= 0 and q.max() <= 1
    clean_acc = (twin.clean_probs(x).argmax(1) == y).float().mean()
    adv_acc = (twin(x_adv, Mode.COMBINED, draws=4).probs.mean(0).argmax(1) == y).float().mean()
    assert adv_acc < clean_acc
    gen = torch.Generator().manual_seed(0)
    for name, transform in BASELINES.items():
        p = predict_baseline(twin.logits, transform, x, 3, gen=gen)
        assert p.is_cuda and torch.allclose(p.sum(1), torch.ones(32, device="cuda"), atol=1e-4), name


def test_evaluate_quick_runs_on_cuda(tmp_path: Path) -> None:
    from service.cli import main

    out = tmp_path / "report"
    argv = ["evaluate", "--bundle", str(BUNDLE), "--budget", "quick", "--device", "cuda", "--out", str(out)]
    assert main([*argv, "--no-progress", "--seeds", "1", "2", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["environment"]["torch_device"] == "cuda" and res["environment"]["gpu"]
    assert all(r["max_perturbation"] <= r["eps"] + 1e-6 for r in res["attacks"])
