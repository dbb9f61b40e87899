"""The model registry: every architecture maps [0,1] images to logits, carries its normalisation, round-trips."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from service.training.models import MODELS, build_model, load_weights, save_weights  # noqa: E402

SHAPES = {"mnist_cnn": (1, 28, 28), "resnet50_3layer": (3, 32, 32), "resnet18": (3, 32, 32)}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_architecture_maps_images_to_logits(arch):
    c, h, w = SHAPES[arch]
    model = build_model(arch, 7, c).eval()
    with torch.no_grad():
        out = model(torch.rand(3, c, h, w))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_normalisation_is_inside_the_model():
    model = build_model("mnist_cnn", 10, 1).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), model.body(2.0 * x - 1.0), atol=1e-6)


def test_reference_resnet50_has_three_stages_of_five_bottlenecks_without_expansion():
    model = build_model("resnet50_3layer", 10, 3)
    body = model.body
    assert body.stem[0].kernel_size == (5, 5) and body.stem[0].stride == (1, 1)
    assert [len(stage) for stage in body.stages] == [5, 5, 5]
    assert [stage[-1].conv3.out_channels for stage in body.stages] == [64, 128, 256]
    assert [stage[0].conv2.stride for stage in body.stages] == [(1, 1), (2, 2), (2, 2)]
    assert body.linear.in_features == 256


def test_eval_outputs_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10, 1)
    model.train()
    with torch.no_grad():  # move BN running stats away from their init
        for _ in range(3):
            model(torch.rand(16, 1, 28, 28))
    model.eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        alone = model(x[:1])
        together = model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_weights_round_trip_through_safetensors(tmp_path):
    a = build_model("mnist_cnn", 10, 1).eval()
    path = tmp_path / "w.safetensors"
    save_weights(a, path)
    b = build_model("mnist_cnn", 10, 1).eval()
    load_weights(b, path)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_unknown_architecture_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="mnist_cnn"):
        build_model("vgg", 10, 3)
