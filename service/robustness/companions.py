"""The files beside a report, folded into its results and rendered as report sections.

``sweep/sweep.json`` (``mixinfer calibrate --sweep``: the lambda trade-off and its pick rule) is compared with the
served parameters, and the comparison says plainly whether they agree and, where not, why the served version stays
(or that a new version is due). ``plateau.json`` (``mixinfer evaluate --plateau``) is summarised: per attack, what
each doubled knob newly broke, whether it plateaued and its accuracy at the unbounded eps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SWEEP_FILE = Path("sweep") / "sweep.json"
PLATEAU_FILE = Path("plateau.json")


def attach(res: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``res`` with ``sweep`` and ``plateau`` taken from the files in ``out_dir`` (when they exist)."""
    res = dict(res)
    if (out_dir / SWEEP_FILE).exists():
        res["sweep"] = json.loads((out_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    if (out_dir / PLATEAU_FILE).exists():
        p = json.loads((out_dir / PLATEAU_FILE).read_text(encoding="utf-8"))
        res["plateau"] = {
            "n_images": p.get("n_images"),
            "eps": p.get("eps"),
            "attacks": {
                name: {k: r[k] for k in ("plateaued", "newly_broken", "accuracy_vs_eps")}
                for name, r in p["attacks"].items()
            },
        }
    return res


def _at(rows: list[dict[str, Any]], lam: float) -> dict[str, Any] | None:
    return next((r for r in rows if abs(r["lam"] - lam) < 1e-9), None)


def _verdict(served: dict[str, Any] | None, pick: dict[str, Any], plain: dict[str, Any]) -> str:
    """Why the pick and the served λ differ, from the numbers (``plain``: the model without MI, λ = 1 in effect)."""
    if served is None:
        return "the served λ is not on the sweep's grid: rerun the sweep with it (`--sweep-lams`)"
    d_clean = 100 * (pick["clean"] - served["clean"])
    d_adv = 100 * (pick["adversarial"] - served["adversarial"])
    deltas = f"clean {d_clean:+.1f}, PGD {d_adv:+.1f} points"
    if d_clean <= 0 and d_adv <= 0:
        return (
            f"the pick is no better on either axis ({deltas}; the rule's tie-break, the larger λ, made it): the served "
            "version stays"
        )
    if d_clean >= 0 and d_adv >= 0:
        if plain["clean"] >= pick["clean"] and plain["adversarial"] >= pick["adversarial"]:
            return (
                f"the milder pick measures better ({deltas}), and no mixing at all (the plain model: clean "
                f"{100 * plain['clean']:.1f}, PGD {100 * plain['adversarial']:.1f} %) better still: on this model the "
                "rule only moves the branch toward the base model, i.e. the branch does not pay; no version ships a "
                "milder λ (serve mode `off` where robustness matters)"
            )
        return f"**the pick measures better on both axes ({deltas}): a new bundle version with it is due**"
    return (
        f"the pick trades one axis for the other ({deltas}), so no λ measures better on both; the served version stays"
    )


def lambda_section(res: dict[str, Any]) -> list[str]:
    """The sweep's pick against the served λ, with the reason they differ (or the note that no sweep was run)."""
    out = ["## λ: the sweep's pick and the served parameters", ""]
    sweep = res.get("sweep")
    if not sweep:
        return [*out, "No sweep beside this report (`mixinfer calibrate --bundle ... --sweep`).", ""]
    mi = res["bundle"]["mi"]
    out += [
        f"`mixinfer calibrate --sweep` ({sweep['n_images']} calibration images, oblivious PGD ε {sweep['eps']:g}, "
        f"{sweep['steps']} steps, {len(sweep['seeds'])} seeds; rule: best PGD accuracy among the λ whose clean "
        f"accuracy is within {100 * sweep['max_clean_drop']:.0f} points of the plain model's "
        f"{100 * sweep['plain']['clean']:.1f} %, ties to the larger λ). Served values are SPEC's defaults (the "
        "paper's). The sweep scores the stand-alone branches only; MI-Combined's OL λ "
        f"({mi['ol_combined']['lam']}) is not swept.",
        "",
        "| branch | served λ | clean / PGD at served (%) | sweep pick | clean / PGD at pick (%) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for branch, served_lam in (("pl", mi["lam_pl"]), ("ol", mi["ol_standalone"]["lam"])):
        rows, pick_lam = sweep[branch]["rows"], sweep[branch]["pick"]
        served, pick = _at(rows, served_lam), _at(rows, pick_lam)
        assert pick is not None, f"sweep pick {pick_lam} not among its rows"
        cell = f"{100 * served['clean']:.1f} / {100 * served['adversarial']:.1f}" if served else "–"
        verdict = "agree" if abs(pick_lam - served_lam) < 1e-9 else _verdict(served, pick, sweep["plain"])
        out.append(
            f"| MI-{branch.upper()} | {served_lam:g} | {cell} | {pick_lam:g} | "
            f"{100 * pick['clean']:.1f} / {100 * pick['adversarial']:.1f} | {verdict} |"
        )
    return [*out, "", "Plot: `sweep/sweep.png`.", ""]


def plateau_line(res: dict[str, Any]) -> str:
    """One sanity-check bullet: whether each plateau attack converged, and its accuracy unbounded."""
    p = res.get("plateau")
    if not p or "attacks" not in p:
        return (
            "- Plateau (steps, EOT draws, restarts doubled, image by image) and accuracy vs ε for the adaptive "
            "attacks: not run beside this report (`mixinfer evaluate --plateau`)."
        )
    parts = []
    for name, r in p["attacks"].items():
        newly = ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["newly_broken"].items())
        unbounded = r["accuracy_vs_eps"].get("1")
        tail = f"; unbounded ε: {100 * unbounded:.0f} %" if unbounded is not None else ""
        parts.append(f"`{name}` {'plateaued' if r['plateaued'] else '**not plateaued**'} (newly broken: {newly}{tail})")
    return f"- Plateau on the first {p['n_images']} images (`plateau.md`, `plateau.png`): " + "; ".join(parts) + "."
