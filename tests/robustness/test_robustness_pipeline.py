"""The differentiable MI twin gives the served engine's outputs for the same partners, and EOT is a true mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.mi.engine import MIEngine
from service.mi.params import Mode
from service.robustness.attacks.core import eot_gradient
from service.robustness.attacks.eot_combined import nll
from service.robustness.data import load_split
from service.robustness.pipeline import DifferentiableMI
from service.store import load_bundle, open_backend

TOL = 1e-4


def _engine_and_twin(bundle, **mi_overrides):
    params = bundle.manifest.mi.model_copy(update=mi_overrides)
    backend = open_backend(bundle, providers=["CPUExecutionProvider"])
    engine = MIEngine(backend, bundle.pool_labels, params)
    twin = DifferentiableMI.from_bundle(bundle)
    twin.params = params
    return engine, twin


@pytest.mark.parametrize("mode", [Mode.PL, Mode.OL, Mode.COMBINED, Mode.OFF])
def test_twin_matches_served_engine_for_the_same_partners(mnist_bundle, mode):
    # threshold at the median clean gap: about half the images take each Combined branch
    x, _, _ = load_split(mnist_bundle, "test", 40)
    engine, twin = _engine_and_twin(mnist_bundle)
    probe = engine(x, Mode.PL, rng=np.random.default_rng(1))
    engine, twin = _engine_and_twin(mnist_bundle, threshold=float(np.median(probe.gap)))
    res = engine(x, mode, rng=np.random.default_rng(7), return_partners=True)
    assert res.partners is not None
    ol = res.partners.ol
    # rows where OL did not run get arbitrary valid partners: the twin must ignore them in combined mode
    ol_given = np.where(ol < 0, 0, ol)[None] if mode is not Mode.PL else None
    out = twin(
        torch.from_numpy(x),
        mode,
        pl_partners=res.partners.pl[None] if mode in (Mode.PL, Mode.COMBINED) else None,
        ol_partners=ol_given if mode in (Mode.OL, Mode.COMBINED) else None,
    )
    np.testing.assert_allclose(out.probs[0].detach().numpy(), res.probs, atol=TOL)
    np.testing.assert_allclose(out.clean.detach().numpy(), res.clean_probs, atol=TOL)
    if mode is Mode.COMBINED:
        assert 0 < res.flagged.sum() < len(res)
        np.testing.assert_array_equal(out.flagged[0].numpy(), res.flagged)
        np.testing.assert_allclose(out.gap[0].detach().numpy(), res.gap, atol=TOL)


def test_twin_of_tiny_onnx_bundle_matches_engine(tiny_bundle):
    # an independent torch twin of the tests' tiny ONNX CNN, built from its weights file
    from safetensors.torch import load

    from service.training.models import Classifier

    bundle = load_bundle(tiny_bundle, require_weights=True)
    c, h, w = bundle.manifest.input.shape
    k = bundle.manifest.n_classes
    body = torch.nn.Sequential(
        torch.nn.Conv2d(c, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * h * w, k)
    )
    model = Classifier(body, "tiny_cnn", k, c)
    model.load_state_dict(load(bundle.weights), strict=True)
    twin = DifferentiableMI(
        model, bundle.pool_images, bundle.pool_labels, bundle.manifest.mi.model_copy(update={"threshold": 0.0})
    )
    engine = MIEngine(
        open_backend(bundle, providers=["CPUExecutionProvider"]),
        bundle.pool_labels,
        twin.params,
    )
    x = np.random.default_rng(0).integers(0, 256, size=(12, c, h, w)).astype(np.float32) / 255
    res = engine(x, Mode.COMBINED, rng=np.random.default_rng(3), return_partners=True)
    assert res.flagged.any()  # threshold 0: every image with a non-negative gap takes the OL branch
    ol = np.where(res.partners.ol < 0, 0, res.partners.ol)[None]
    out = twin(torch.from_numpy(x), Mode.COMBINED, pl_partners=res.partners.pl[None], ol_partners=ol)
    np.testing.assert_array_equal(out.flagged[0].numpy(), res.flagged)
    np.testing.assert_allclose(out.probs[0].detach().numpy(), res.probs, atol=TOL)


def test_twin_draws_follow_the_engine_sampling_rules(mnist_bundle):
    twin = DifferentiableMI.from_bundle(mnist_bundle)
    y_hat = np.arange(10, dtype=np.int64)
    gen = np.random.default_rng(0)
    pl = twin.draw(y_hat, 5, 3, True, gen)
    ol = twin.draw(y_hat, 15, 3, False, gen)
    labels = mnist_bundle.pool_labels
    assert pl.shape == (3, 10, 5) and ol.shape == (3, 10, 15)
    assert (labels[pl] == y_hat[None, :, None]).all()
    assert (labels[ol] != y_hat[None, :, None]).all()


@pytest.mark.parametrize("chunk", [1, 3])
def test_eot_gradient_is_the_mean_of_per_draw_gradients(mnist_bundle, chunk):
    x_np, y_np, _ = load_split(mnist_bundle, "test", 4)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    twin = DifferentiableMI.from_bundle(mnist_bundle)
    twin.params = twin.params.model_copy(update={"threshold": 0.0})  # every draw takes both branches' graph
    draws = 4
    y_hat = twin.clean_probs(x).argmax(1).numpy()
    gen = np.random.default_rng(5)
    pl = twin.draw(y_hat, twin.params.n_pl, draws, True, gen)
    ol = twin.draw(y_hat, twin.params.ol_combined.n, draws, False, gen)
    cursor = [0]

    def loss_fn(xg, yy, n):
        sl = slice(cursor[0], cursor[0] + n)
        cursor[0] += n
        return nll(twin(xg, Mode.COMBINED, pl_partners=pl[sl], ol_partners=ol[sl]).probs, yy)

    loss, grad = eot_gradient(loss_fn, x, y, draws, chunk)
    per_draw = []
    for d in range(draws):
        xg = x.clone().requires_grad_(True)
        ld = nll(twin(xg, Mode.COMBINED, pl_partners=pl[d : d + 1], ol_partners=ol[d : d + 1]).probs, y)
        per_draw.append(torch.autograd.grad(ld.sum(), xg)[0])
    expected = torch.stack(per_draw).mean(0)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)
    assert loss.shape == (4,)
