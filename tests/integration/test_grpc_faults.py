"""gRPC faults as REST answers them: load shedding is not an ERROR line per refused call, a 5xx names its request
id, an unexpected failure is INTERNAL without its detail."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import pytest
from mixserver import Gate, wait_until
from test_grpc_oip import _live, contextlib_grpc, images, raw_request

pytestmark = pytest.mark.integration


def test_load_shedding_is_not_logged_as_an_error_and_a_5xx_names_its_request_id(http_store: Path, caplog):
    """As REST: a refusal while not ready (or with a full queue) is expected load shedding, not an ERROR line per
    call (a flood under overload); a 5xx message names the request id, to find the call in the access log."""
    gate = Gate()
    gate.hold_warmup = True
    with contextlib_grpc(http_store, wrap=gate, wait_ready=False) as g:
        wait_until(lambda: _live(g), 20, "gRPC live")
        caplog.clear()
        with pytest.raises(grpc.RpcError) as err:
            g.stub.ModelInfer(raw_request(images(1)), metadata=(("x-request-id", "shed-1"),))
        gate.warm.set()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "(request id shed-1)" in err.value.details()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("service.")]
    assert errors == []


def test_an_unexpected_failure_is_internal_and_names_its_request_id(http_store: Path):
    """As REST's 500: INTERNAL, no detail of the fault, the request id to find the server's log line."""
    failing = threading.Event()

    def broken(inner):
        class Broken:
            n_classes, input_shape, provider = inner.n_classes, inner.input_shape, inner.provider

            def probs(self, x):
                if failing.is_set():
                    raise RuntimeError("the device fell off the bus")
                return inner.probs(x)

            def mean_mix_probs(self, x, p, lam):
                if failing.is_set():
                    raise RuntimeError("the device fell off the bus")
                return inner.mean_mix_probs(x, p, lam)

            def warmup(self, sizes, mixes=(1,)):
                inner.warmup(sizes, mixes)

        return Broken()

    with contextlib_grpc(http_store, wrap=broken) as g, pytest.raises(grpc.RpcError) as err:
        failing.set()
        g.stub.ModelInfer(raw_request(images(1)), metadata=(("x-request-id", "boom-1"),))
    assert err.value.code() is grpc.StatusCode.INTERNAL, err.value.details()
    assert "(request id boom-1)" in err.value.details() and "fell off" not in err.value.details()
