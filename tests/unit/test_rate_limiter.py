"""The per-client token buckets (outside review): bounded memory and O(1) work however many clients rotate."""

from __future__ import annotations

import pytest

from service.api.deps import MAX_BUCKETS, RateLimiter
from service.errors import RateLimitedError


def test_bucket_table_stays_bounded_when_many_fresh_clients_arrive_at_once():
    # 3x the cap of distinct addresses within a second (an attacker rotating IPv6 addresses, or clients behind a
    # trusted proxy): the table used to keep every bucket that had not refilled, so it grew with the request rate
    limiter = RateLimiter(0.01, burst=10.0, per="client address")  # a bucket refills in 1,000 s
    for i in range(3 * MAX_BUCKETS):
        limiter.take(f"2001:db8::{i:x}")
    assert limiter.tracked() <= MAX_BUCKETS


def test_the_most_recent_clients_keep_their_spent_tokens():
    limiter = RateLimiter(0.001, burst=1.0)
    limiter.take("busy")
    for i in range(MAX_BUCKETS // 2):
        limiter.take(f"other-{i}")
    with pytest.raises(RateLimitedError):
        limiter.take("busy")  # still spent: evicting it would hand back a full burst
