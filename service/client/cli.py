"""``mixinfer predict FILE...``: classify image files on a running server, as a table or JSON lines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.clients import Client
    from service.client.results import ApiError, Prediction

#: where ``--api-key`` is read from when the flag is not given
API_KEY_ENV = "MIXINFER_CLIENT_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
#: statuses for which a failed batch is sent again one file at a time: one bad file must not fail the others
_PER_FILE_STATUSES = frozenset({400, 413, 415})


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``predict`` (imports nothing heavy: httpx and tqdm are imported when it runs)."""
    p = subparsers.add_parser(
        "predict",
        help="classify image files on a running server",
        description="Send image files to a mixinfer server (POST /predict, several files per request) and print "
        "one row per file: label, adversarial flag and, where the server discloses it, the detection gap. Exit "
        "code 0 only when every file got an answer.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="image files (PNG, JPEG, WebP, BMP, GIF)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server's base URL (default: {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help=f"bearer API key (default: ${API_KEY_ENV})")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of a table")
    p.add_argument("--batch-size", type=int, default=32, help="files per request (default: 32)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one response (default: 30)")
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> int:
    """Classify ``args.files``; 0 when every file got an answer, 1 otherwise."""
    from service.client.clients import Client  # needs httpx: the 'client' extra

    if args.batch_size < 1:
        print(f"mixinfer predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    if not getattr(args, "verbose", False):  # httpx logs every request at INFO: only with mixinfer -v
        logging.getLogger("httpx").setLevel(logging.WARNING)
    files: list[str] = args.files
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    outcomes: list[Prediction | ApiError] = []
    show_bar = len(files) > 1 and not args.json
    with (
        Client(args.url, api_key=api_key, timeout_s=args.timeout) as client,
        tqdm(total=len(files), unit="file", file=sys.stderr, disable=None if show_bar else True) as bar,
    ):
        for start in range(0, len(files), args.batch_size):
            batch = files[start : start + args.batch_size]
            answers = answer_batch(client, batch)
            if args.json:
                for name, outcome in zip(batch, answers, strict=True):
                    print(json.dumps(json_row(name, outcome)), flush=True)
            outcomes.extend(answers)
            bar.update(len(batch))
    failed = [(name, o) for name, o in zip(files, outcomes, strict=True) if not _answered(o)]
    if not args.json:
        print(table(files, outcomes))
    for name, error in failed:
        print(f"mixinfer predict: {name}: {error}", file=sys.stderr)
    if failed:
        print(f"mixinfer predict: {len(failed)} of {len(files)} files got no answer", file=sys.stderr)
    return 1 if failed else 0


def answer_batch(client: Client, files: Sequence[str]) -> list[Prediction | ApiError]:
    """One answer or error per file: unreadable files fail alone; a batch the server refuses for one bad image
    is sent again file by file, so that the others still get their answer."""
    from service.client.results import ApiError

    outcomes: list[Prediction | ApiError | None] = [None] * len(files)
    blobs: list[tuple[int, bytes]] = []
    for i, name in enumerate(files):
        try:
            blobs.append((i, Path(name).read_bytes()))
        except OSError as exc:
            outcomes[i] = ApiError(None, "unreadable_file", f"{exc.strerror or exc}: {name}")
    if blobs:
        try:
            for (i, _), answer in zip(blobs, client.predict([b for _, b in blobs]), strict=True):
                outcomes[i] = answer
        except ApiError as error:
            if error.status in _PER_FILE_STATUSES and len(blobs) > 1:
                for i, blob in blobs:
                    outcomes[i] = _one(client, blob)
            else:
                for i, _ in blobs:
                    outcomes[i] = error
    return [o for o in outcomes if o is not None]


def _one(client: Client, blob: bytes) -> Prediction | ApiError:
    from service.client.results import ApiError

    try:
        return client.predict([blob])[0]
    except ApiError as error:
        return error


def _answered(outcome: Prediction | ApiError) -> bool:
    return not isinstance(outcome, Exception)


def json_row(name: str, outcome: Prediction | ApiError) -> dict[str, Any]:
    """The ``--json`` object of one file: the prediction's fields, or ``error`` with the server's code."""
    if isinstance(outcome, Exception):
        return {"file": name, "error": {"status": outcome.status, "code": outcome.code, "message": outcome.message}}
    return {"file": name, **dataclasses.asdict(outcome)}


def table(files: Sequence[str], outcomes: Sequence[Prediction | ApiError]) -> str:
    """A plain text table: file, label, adversarial, gap (when the server gave any), error (when any failed)."""
    with_gap = any(not isinstance(o, Exception) and o.gap is not None for o in outcomes)
    with_error = any(isinstance(o, Exception) for o in outcomes)
    header = ["file", "label", "adversarial"] + (["gap"] if with_gap else []) + (["error"] if with_error else [])
    rows = [header]
    for name, o in zip(files, outcomes, strict=True):
        if isinstance(o, Exception):
            row = [name, "-", "-"] + (["-"] if with_gap else []) + [o.code]
        else:
            flag = "-" if o.adversarial is None else ("yes" if o.adversarial else "no")
            row = [name, o.label, flag]
            if with_gap:
                row.append("-" if o.gap is None else f"{o.gap:.4f}")
            if with_error:
                row.append("")
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)
