"""The query watch against real black-box attacks (IBM ART) and benign traffic, through a real server over HTTP.

Each attacked image gets its own client: its own loopback source address (127.x.y.z; the server identifies
clients by address when it runs without API keys). Every query the attack makes is one HTTP request
(one image), so the watch's verdict is known query by query; the server runs in this process (a real uvicorn on
a loopback port) so that the script can read each client's hit count after each query. Attacks, in the order of
the issue: ART's SquareAttack and SimBA (score-based, at both response-detail levels), HopSkipJump and
BoundaryAttack (decision-based: labels only), an OARS-style adaptive Square (noise between queries and rejection
sampling under ``reject``) and a Square spread over many keys. Benign traffic: the bundle's test split from
several clients with resends and re-encoded near-duplicates (JPEG, resize, flip).

    .venv/bin/python bench/query_attacks.py --images 50 --queries 5000 --out docs/robustness/query-watch
    .venv/bin/python bench/query_attacks.py --smoke --json      # what `make test` runs (2 images, 300 queries)

SimBA stops at its first success, Square too: at the bundle's eps 0.3 Square fools the undefended-looking MNIST
model in a handful of queries, before any stateful detector has seen enough near-copies (the report says so).

Success of an attack means a query answered with a wrong label within the threat model (L-inf <= eps for the
L-inf attacks, L2 <= l2_eps for the L2 ones); "before detection" means before the client's ``ban_hits``-th hit.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import io
import json
import logging
import shlex
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.common import ROOT, emit_json, log, machine_info

BENIGN_CLIENTS = 8
#: the adaptive attackers: name -> (noise per query, clients the queries are spread over)
ADAPTIVE = {"oars": (0.1, 1), "spread": (0.0, 16)}


def address(i: int) -> str:
    """The i-th client's loopback source address (all of 127.0.0.0/8 is loopback on Linux)."""
    i += 2
    return f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def http_from(url: str, i: int) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address=address(i)))


class BudgetSpentError(Exception):
    """Raised inside ART's predict call when the attacked image's query budget is spent."""


@dataclass
class Trace:
    """What one attacked image's client saw, query by query."""

    queries: int = 0
    refused: int = 0
    first_hit: int | None = None
    suspect_at: int | None = None
    first_success: int | None = None
    success_after_refusals: bool = False
    #: queries that near-copied an earlier query of another client (service-wide hits), and the first one
    service_hits: int = 0
    first_service_hit: int | None = None


@contextmanager
def serve(bundle: Path, policy: str, ban_hits: int, detail: str) -> Iterator[tuple[str, Any]]:
    """A real uvicorn server (this process, a thread), no API keys: clients are told apart by address."""
    import uvicorn

    from service.api.app import create_app
    from service.config import Settings

    settings = Settings(
        model_dir=bundle.parent.parent,
        model_name=bundle.parent.name,
        model_version=bundle.name,
        providers=("CPUExecutionProvider",),
        query_watch=policy,
        query_watch_ban_hits=ban_hits,
        response_detail=detail,
        max_images_per_request=256,
        seed=0,  # the served randomness is fixed: a rerun reproduces every row
        log_json=False,
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(url + "/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Oracle:
    """The attacker's view of the server for one attacked image: one HTTP request per query, one key."""

    def __init__(self, url: str, app: Any, client: int, x0: np.ndarray, label: int, cfg: EvalConfig) -> None:
        self.url, self.app, self.x0, self.label, self.cfg = url, app, x0, label, cfg
        self.number = client
        self.client = address(client)
        self.http = http_from(url, client)
        self.trace = Trace()
        names = app.state.holder.model.class_names
        self.n_classes = len(names)
        self.class_index = {name: i for i, name in enumerate(names)}

    def ask(self, x: np.ndarray) -> tuple[int, np.ndarray | None]:
        """(status, probabilities as the response detail shows them) for one image (C, H, W) in [0, 1]."""
        t = self.trace
        if t.queries >= self.cfg.queries:
            raise BudgetSpentError
        t.queries += 1
        body = {"inputs": [{"name": "images", "shape": [1, *x.shape], "datatype": "FP32", "data": x.ravel().tolist()}]}
        watch = self.app.state.query_screen.watch
        service_before = watch.service_hits
        resp = self.http.post("/v2/models/" + self.app.state.holder.model.name + "/infer", json=body)
        hits = watch.hits_of(self.client)
        if watch.service_hits > service_before:
            t.service_hits += 1
            if t.first_service_hit is None:
                t.first_service_hit = t.queries
        if hits and t.first_hit is None:
            t.first_hit = t.queries
        if hits >= self.cfg.ban_hits and t.suspect_at is None:
            t.suspect_at = t.queries
        if resp.status_code == 403:
            t.refused += 1
            return 403, None
        resp.raise_for_status()
        probs = self.probabilities({o["name"]: o["data"] for o in resp.json()["outputs"]})
        if int(np.argmax(probs)) != self.label and self.within_threat(x) and t.first_success is None:
            t.first_success = t.queries
            t.success_after_refusals = t.refused > 0
        return 200, probs

    def sibling(self, i: int) -> Oracle:
        """Another client attacking the same image (the attacker that spreads its queries over many clients)."""
        return Oracle(self.url, self.app, self.number * 64 + 1_000_000 + i, self.x0, self.label, self.cfg)

    def within_threat(self, x: np.ndarray) -> bool:
        d = (x - self.x0).ravel()
        if self.cfg.norm == "inf":
            return float(np.abs(d).max()) <= self.cfg.eps + 1e-6
        return float(np.linalg.norm(d)) <= self.cfg.l2_eps + 1e-6

    def probabilities(self, outputs: dict[str, list[Any]]) -> np.ndarray:
        """The class probabilities as the attacker estimates them from what the response shows: all of them at
        ``full`` detail; at ``label`` detail the top-3, the rest of the mass spread evenly over the other classes."""
        if "probabilities" in outputs:
            return np.asarray(outputs["probabilities"], dtype=np.float32)
        top = [self.class_index[str(name)] for name in outputs["top_classes"]]
        top_p = np.asarray(outputs["top_probabilities"], dtype=np.float32)
        rest = max(0.0, 1.0 - float(top_p.sum())) / max(1, self.n_classes - len(top))
        probs = np.full(self.n_classes, rest, dtype=np.float32)
        probs[top] = top_p
        return probs

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """ART's predict_fn: probabilities per image; a refusal looks like the true class (no information)."""
        out = np.zeros((len(batch), self.n_classes), dtype=np.float32)
        for i, x in enumerate(batch):
            _, probs = self.ask(x.astype(np.float32))
            if probs is None:
                out[i, self.label] = 1.0
            else:
                out[i] = probs
        return out


@dataclass
class EvalConfig:
    queries: int = 5000
    eps: float = 0.3
    l2_eps: float = 2.0
    norm: str = "inf"
    ban_hits: int = 10


def art_attack(name: str, classifier: Any, cfg: EvalConfig) -> Any:
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SimBA, SquareAttack

    q = cfg.queries
    if name == "square":
        return SquareAttack(
            classifier, norm=np.inf, eps=cfg.eps, max_iter=q, nb_restarts=1, batch_size=1, verbose=False
        )
    if name == "simba":
        return SimBA(classifier, attack="px", epsilon=cfg.eps, max_iter=q, batch_size=1, verbose=False)
    if name == "hopskipjump":
        return HopSkipJump(classifier, norm=2, max_iter=50, max_eval=200, init_eval=20, batch_size=1, verbose=False)
    if name == "boundary":
        return BoundaryAttack(classifier, targeted=False, max_iter=q, batch_size=1, verbose=False)
    raise ValueError(name)


def classifier_for(oracle: Oracle, shape: tuple[int, ...]) -> Any:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        oracle.predict, input_shape=shape, nb_classes=oracle.n_classes, clip_values=(0.0, 1.0)
    )


def run_art(name: str, oracle: Oracle) -> None:
    clf = classifier_for(oracle, oracle.x0.shape)
    attack = art_attack(name, clf, oracle.cfg)
    with suppress(BudgetSpentError):
        attack.generate(oracle.x0[None], y=np.eye(oracle.n_classes, dtype=np.float32)[[oracle.label]])


def run_random_search(oracle: Oracle, rng: np.random.Generator, noise: float, spread: int, tries: int = 10) -> None:
    """An adaptive random search in the style of OARS (Feng et al. 2023) on Square's moves: each query blurred by
    fresh uniform noise of +-``noise`` (to break fingerprints), a refused query resampled up to ``tries`` times (the
    refusal is the oracle), the queries spread round-robin over ``spread`` clients. The budget counts every query
    of every client."""
    cfg = oracle.cfg
    x0 = oracle.x0
    clients = [oracle] + [oracle.sibling(i) for i in range(1, spread)]
    best, best_margin, q = x0.copy(), np.inf, 0
    try:
        while True:
            size = max(1, round(x0.shape[-1] * max(0.05, 0.5 * (1 - q / 1000))))
            r, c = rng.integers(0, x0.shape[-1] - size + 1, 2)
            cand = best.copy()
            step = rng.choice([-cfg.eps, cfg.eps], size=(x0.shape[0], 1, 1))
            cand[..., r : r + size, c : c + size] = np.clip(x0[..., r : r + size, c : c + size] + step, 0, 1)
            probs = None
            for _ in range(tries):
                if q >= cfg.queries:
                    raise BudgetSpentError
                query = cand + rng.uniform(-noise, noise, cand.shape).astype(np.float32) if noise else cand
                query = np.clip(np.clip(query, x0 - cfg.eps, x0 + cfg.eps), 0, 1).astype(np.float32)
                _, probs = clients[q % spread].ask(query)
                q += 1
                if probs is not None:
                    break
            if probs is not None:
                margin = probs[oracle.label] - np.max(np.delete(probs, oracle.label))
                if margin < best_margin:
                    best, best_margin = query, margin
    except BudgetSpentError:
        pass
    finally:
        for sib in clients[1:]:
            sib.http.close()
    t = oracle.trace  # one attack, many clients: what they saw together (query numbers are per client)
    for kt in (k.trace for k in clients[1:]):
        t.queries += kt.queries
        t.refused += kt.refused
        t.service_hits += kt.service_hits
        for f in ("first_hit", "suspect_at", "first_success", "first_service_hit"):
            v = getattr(kt, f)
            if v is not None and (getattr(t, f) is None or v * spread < getattr(t, f)):
                setattr(t, f, v * spread)


@dataclass
class Row:
    attack: str
    detail: str
    policy: str
    traces: list[Trace] = field(default_factory=list)

    def summary(self, ban_hits: int) -> dict[str, Any]:
        n = len(self.traces)
        detect = [t.suspect_at for t in self.traces if t.suspect_at is not None]
        first = [t.first_hit for t in self.traces if t.first_hit is not None]
        within50 = sum(1 for t in self.traces if t.suspect_at is not None and t.suspect_at <= 50)
        long_runs = sum(1 for t in self.traces if t.queries >= 50)
        hit50 = sum(1 for t in self.traces if t.first_hit is not None and t.first_hit <= 50)
        before = sum(
            1
            for t in self.traces
            if t.first_success is not None and (t.suspect_at is None or t.first_success < t.suspect_at)
        )
        success = sum(1 for t in self.traces if t.first_success is not None)
        return {
            "attack": self.attack,
            "detail": self.detail,
            "policy": self.policy,
            "images": n,
            "detected": len(detect),
            "detected_within_50": within50,
            "first_hit_within_50": hit50,
            "ran_50_queries": long_runs,
            "queries_to_suspect_median": round(float(np.median(detect)), 1) if detect else None,
            "queries_to_suspect_p95": round(float(np.percentile(detect, 95)), 1) if detect else None,
            "queries_to_first_hit_median": round(float(np.median(first)), 1) if first else None,
            "success_before_detection": before,
            "success": success,
            "queries_mean": float(np.mean([t.queries for t in self.traces])) if n else 0.0,
            "refused_mean": float(np.mean([t.refused for t in self.traces])) if n else 0.0,
            "service_hit_within_50": sum(
                1 for t in self.traces if t.first_service_hit is not None and t.first_service_hit <= 50
            ),
        }


def benign(url: str, app: Any, images: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """The test split from BENIGN_KEYS clients: each image once, 10 % resent (1-3 times), 10 % re-encoded."""
    watch = app.state.query_screen.watch
    sent = 0
    https = [http_from(url, 500_000 + k) for k in range(BENIGN_CLIENTS)]
    for i, img in enumerate(images):
        http = https[i % BENIGN_CLIENTS]
        variants = [img]
        if rng.random() < 0.1:
            variants += [img] * int(rng.integers(1, 4))
        if rng.random() < 0.1:
            variants.append(reencoded(img, rng))
        for v in variants:
            resp = http.post("/predict", content=png(v), headers={"content-type": "image/png"})
            resp.raise_for_status()
            sent += 1
    for http in https:
        http.close()
    hits = {k: watch.hits_of(address(500_000 + k)) for k in range(BENIGN_CLIENTS)}
    suspects = sum(1 for h in hits.values() if h >= watch.config.ban_hits)
    total = sum(hits.values())
    return {
        "queries": sent,
        "clients": BENIGN_CLIENTS,
        "false_hits": total,
        "false_hits_per_10k": round(1e4 * total / max(1, sent), 2),
        "false_positive_clients": suspects,
    }


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    arr = np.rint(x * 255).astype(np.uint8)
    Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))).save(buf, "PNG")
    return buf.getvalue()


def reencoded(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A benign near-duplicate: JPEG at another quality, a resize round trip, or a flip."""
    img = Image.fromarray(np.rint(x[0] * 255).astype(np.uint8))
    kind = rng.integers(0, 3)
    if kind == 0:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(50, 95)))
        img = Image.open(buf)
    elif kind == 1:
        img = img.resize((20, 20)).resize((x.shape[-1], x.shape[-2]))
    else:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(img, dtype=np.float32) / 255.0)[None]


def attack_row(
    attack: str,
    detail: str,
    policy: str,
    url: str,
    app: Any,
    x: np.ndarray,
    y: np.ndarray,
    attacked: np.ndarray,
    cfg: EvalConfig,
    first_client: int,
) -> Row:
    """One attack on every attacked image, each image from a client of its own."""
    row = Row(attack, detail, policy)
    norm = "2" if attack in ("hopskipjump", "boundary") else "inf"
    for n, i in enumerate(attacked):
        oracle = Oracle(url, app, first_client + n, x[i], int(y[i]), EvalConfig(**{**asdict(cfg), "norm": norm}))
        if attack in ADAPTIVE:
            run_random_search(oracle, np.random.default_rng(int(i)), *ADAPTIVE[attack])
        else:
            run_art(attack, oracle)
        oracle.http.close()
        row.traces.append(oracle.trace)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bundle",
        type=Path,
        default=ROOT / "model_store/mnist-mixup/1",
        help="bundle to serve (default: version 1, the bundle of the committed report docs/robustness/query-watch; "
        "the served version 2 differs only in the OL λ of flagged answers)",
    )
    parser.add_argument("--images", type=int, default=50, help="attacked images per attack")
    parser.add_argument("--queries", type=int, default=5000, help="query budget per attacked image")
    parser.add_argument("--benign", type=int, default=None, help="benign images (default: the whole test split)")
    parser.add_argument("--attacks", default="square,simba,hopskipjump,boundary,oars,spread")
    parser.add_argument("--policies", default="observe,reject", help="watch policies to run, in order")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="only write one report (--out) from the results.json of runs made with --policies in parallel",
    )
    parser.add_argument("--ban-hits", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.3, help="L-inf threat model of the score-based attacks")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and report.md here")
    parser.add_argument("--smoke", action="store_true", help="2 images, 300 queries, simba and hopskipjump")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.combine:
        write_results(combine([json.loads(p.read_text()) for p in args.combine]), args.out, args.json)
        return 0
    if args.smoke:
        args.images, args.queries, args.benign, args.attacks = 2, 300, 200, "simba,hopskipjump"
    logging.basicConfig(level=logging.ERROR)
    from service.robustness.data import load_split
    from service.store import load_bundle

    bundle = load_bundle(args.bundle)
    x, y, _ = load_split(bundle, "test")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    attacked = order[: args.images]
    cfg = EvalConfig(queries=args.queries, ban_hits=args.ban_hits, eps=args.eps)
    t0 = time.monotonic()
    rows: list[Row] = []
    score_based = ("square", "simba")
    attacks = args.attacks.split(",")
    benign_result: dict[str, Any] = {}
    for policy in args.policies.split(","):
        for detail in ("full", "label"):  # a stranger's view is `label`; `full` is what an operator may enable
            planned = [a for a in attacks if detail == "label" or a in score_based]
            if not planned:
                continue
            with serve(args.bundle, policy, args.ban_hits, detail) as (url, app):
                client = 0
                for attack in planned:
                    rows.append(attack_row(attack, detail, policy, url, app, x, y, attacked, cfg, client))
                    client += len(attacked)
                    log("%s/%s/%s: %s", attack, detail, policy, rows[-1].summary(args.ban_hits))
                if policy == "observe" and detail == "label":
                    n_benign = len(x) if args.benign is None else args.benign
                    benign_result = benign(url, app, x[order[args.images : args.images + n_benign]], rng)
                    log("benign: %s", benign_result)
    results = {
        "machine": machine_info(),
        "bundle": str(args.bundle.relative_to(ROOT)) if args.bundle.is_relative_to(ROOT) else str(args.bundle),
        "config": asdict(cfg),
        "images": int(args.images),
        "rows": [r.summary(args.ban_hits) for r in rows],
        "benign": benign_result,
        "seconds": round(time.monotonic() - t0, 1),
        "command": "bench/query_attacks.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    write_results(results, args.out, args.json)
    return 0


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same configuration with different policies (run in parallel processes)."""
    first = parts[0]
    return {
        **first,
        "rows": [row for part in parts for row in part["rows"]],
        "benign": next((p["benign"] for p in parts if p["benign"]), {}),
        "seconds": round(sum(p["seconds"] for p in parts), 1),
        "command": " ; ".join(p["command"] for p in parts),
    }


def write_results(results: dict[str, Any], out: Path | None, as_json: bool) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "report.md").write_text(report(results))
    if as_json:
        emit_json(results)


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Query watch against black-box attacks",
        "",
        f"Regenerate: `.venv/bin/python {results['command']}` ({results['seconds']} s on "
        f"{results['machine'].get('cpu', 'this machine')}).",
        f"Bundle `{results['bundle']}`; {results['images']} attacked images per row, at most "
        f"{results['config']['queries']} queries each; a client is suspect at {results['config']['ban_hits']} hits; "
        f"success = a wrong answer within L-inf {results['config']['eps']} (L2 {results['config']['l2_eps']} for "
        "HopSkipJump and Boundary).",
        "",
        "| attack | detail | policy | suspect | suspect within 50 q | first hit within 50 q | service-wide hit "
        "within 50 q | ran >= 50 q | queries to suspect (median / p95) | first hit (median) | success before "
        "suspect | success | queries (mean) | refused (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['attack']} | {r['detail']} | {r['policy']} | {r['detected']}/{r['images']} | "
            f"{r['detected_within_50']}/{r['images']} | {r['first_hit_within_50']}/{r['images']} | "
            f"{r['service_hit_within_50']}/{r['images']} | "
            f"{r['ran_50_queries']}/{r['images']} | "
            f"{r['queries_to_suspect_median']} / {r['queries_to_suspect_p95']} | "
            f"{r['queries_to_first_hit_median']} | {r['success_before_detection']}/{r['images']} | "
            f"{r['success']}/{r['images']} | {r['queries_mean']:.0f} | {r['refused_mean']:.0f} |"
        )
    b = results["benign"]
    lines += (
        []
        if not b
        else [
            "",
            f"Benign: {b['queries']} queries from {b['clients']} clients (the test split, 10 % resent 1-3 times, 10 % "
            f"re-encoded as JPEG / resized / flipped): {b['false_hits']} false hits ({b['false_hits_per_10k']} per "
            f"10,000 queries), {b['false_positive_clients']} false-positive clients.",
            "",
        ]
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
