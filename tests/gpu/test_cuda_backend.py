"""The CUDA path: the session really runs on CUDA, the fused device-resident path and static shapes are chosen, numbers
match the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.backends.providers import CPU, CUDA
from service.mi.engine import MIEngine, Partners
from service.mi.params import MIParams, Mode
from service.store import load_bundle, open_backend

ort = pytest.importorskip("onnxruntime")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu's CUDA provider"),
]

#: CUDA convolutions may use TF32 / other reduction orders: compare probabilities loosely
ATOL = 2e-3


def test_cuda_session_uses_cuda_and_the_fused_device_path(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    gpu = open_backend(bundle, providers=[CUDA])
    assert gpu.provider == CUDA
    assert gpu.mixing == "fused"
    assert gpu._fused is not None and gpu._fused.get_providers()[0] == CUDA
    assert gpu.static_shapes  # on by default on CUDA: every session only ever sees one input shape
    gpu.warmup((1, 8), mixes_per_image=(5, 15))
    assert {("classifier", 8, 1), ("fused", 1, 5), ("fused", 8, 15)} <= set(gpu.static_sessions)


@pytest.mark.parametrize("mixing", ["fused", "host"])
def test_cuda_numbers_match_the_cpu_host_path(tiny_bundle: Path, mixing: str) -> None:
    bundle = load_bundle(tiny_bundle)
    cpu = open_backend(bundle, providers=[CPU], mixing="host")
    gpu = open_backend(bundle, providers=[CUDA, CPU], mixing=mixing, max_mixes_per_call=64)
    rng = np.random.default_rng(0)
    x = rng.random((33, 1, 8, 8), dtype=np.float32)
    partners = rng.integers(0, bundle.pool_images.shape[0], size=(33, 15))
    np.testing.assert_allclose(gpu.probs(x), cpu.probs(x), atol=ATOL)
    np.testing.assert_allclose(gpu.mean_mix_probs(x, partners, 0.4), cpu.mean_mix_probs(x, partners, 0.4), atol=ATOL)


def test_cuda_engine_matches_the_cpu_engine_on_the_same_partners(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    params = MIParams(threshold=0.04)
    cpu = MIEngine(open_backend(bundle, providers=[CPU]), bundle.pool_labels, params, seed=0)
    gpu = MIEngine(open_backend(bundle, providers=[CUDA]), bundle.pool_labels, params, seed=0)
    x = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    a = cpu(x, Mode.COMBINED, return_partners=True)
    assert a.partners is not None
    ol_all = cpu.pool.sample_other(a.clean_probs.argmax(axis=1), params.ol_combined.n, np.random.default_rng(2))
    ol_all[a.flagged] = a.partners.ol[a.flagged]  # every row has OL partners, even if a decision flips on the GPU
    b = gpu(x, Mode.COMBINED, partners=Partners(a.partners.pl, ol_all))
    np.testing.assert_allclose(b.gap, a.gap, atol=ATOL)
    near = np.abs(a.gap - params.threshold) < ATOL  # decisions may only differ right at the threshold
    np.testing.assert_array_equal(b.flagged[~near], a.flagged[~near])
    same = b.flagged == a.flagged
    np.testing.assert_allclose(b.probs[same], a.probs[same], atol=ATOL)
