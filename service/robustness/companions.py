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

from service.robustness.sweep import BRANCH_FIELD, BRANCH_LABEL, served_lam

SWEEP_FILE = Path("sweep") / "sweep.json"
PLATEAU_FILE = Path("plateau.json")


def _mismatch(found: dict[str, Any], res: dict[str, Any], *, plateau: bool) -> str | None:
    """Why a companion file does not belong to the report ``res`` (None: it does)."""
    b = res["bundle"]
    fb = found.get("bundle")
    if fb and (fb.get("name"), fb.get("version")) != (b["name"], b["version"]):
        return f"bundle {fb.get('name')}/{fb.get('version')}, the report's {b['name']}/{b['version']}"
    eps = res["threat"]["eps"]
    if found.get("eps") is not None and abs(float(found["eps"]) - eps) > 1e-9:
        return f"eps {found['eps']:g}, the report's {eps:g}"
    if not plateau:
        return None
    for key in ("seeds", "attack_seed"):
        if key in found and found[key] != res.get(key):
            return f"{key} {found[key]}, the report's {res.get(key)}"
    idx = found.get("test_indices")
    if idx is not None and idx != res["test_indices"][: len(idx)]:
        return "images that are not the first of the report's"
    return None


def attach(res: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``res`` with ``sweep`` and ``plateau`` from the files in ``out_dir`` when they belong to it.

    A file from another bundle or setting (eps, seeds, attack seed, images) is not attached: the section says so.
    Keys of an earlier attach are dropped first, so a removed or replaced file never lingers in ``results.json``.
    """
    res = {k: v for k, v in res.items() if k not in ("sweep", "plateau", "companions_skipped")}
    skipped: list[str] = []

    def load(name: Path, *, plateau: bool) -> dict[str, Any] | None:
        if not (out_dir / name).exists():
            return None
        found: dict[str, Any] = json.loads((out_dir / name).read_text(encoding="utf-8"))
        why = _mismatch(found, res, plateau=plateau)
        if why:
            skipped.append(f"`{name}` ran on another setting ({why}): not used")
            return None
        return found

    sweep = load(SWEEP_FILE, plateau=False)
    if sweep is not None:
        res["sweep"] = sweep
    p = load(PLATEAU_FILE, plateau=True)
    if p is not None:
        res["plateau"] = {
            "n_images": p.get("n_images"),
            "eps": p.get("eps"),
            "attacks": {
                name: {k: r[k] for k in ("plateaued", "newly_broken", "accuracy_vs_eps", "robust_at_base")}
                for name, r in p["attacks"].items()
            },
        }
    if skipped:
        res["companions_skipped"] = skipped
    return res


def _at(rows: list[dict[str, Any]], lam: float) -> dict[str, Any] | None:
    return next((r for r in rows if abs(r["lam"] - lam) < 1e-9), None)


def _verdict(
    served: dict[str, Any] | None, pick: dict[str, Any], rows: list[dict[str, Any]], sweep: dict[str, Any]
) -> str:
    """Why the pick and the served λ differ, from the numbers; differences under one image count as ties."""
    if served is None:
        return "the served λ is not on the sweep's grid: rerun the sweep with it (`--sweep-lams`)"
    one = 1.0 / sweep["n_images"]
    plain = sweep["plain"]

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:  # better on one axis, not worse on the other
        dc, da = a["clean"] - b["clean"], a["adversarial"] - b["adversarial"]
        return dc > -one / 2 and da > -one / 2 and (dc >= one or da >= one)

    deltas = (
        f"clean {100 * (pick['clean'] - served['clean']):+.1f}, "
        f"PGD {100 * (pick['adversarial'] - served['adversarial']):+.1f} points"
    )
    qualifies = pick["clean"] >= plain["clean"] - sweep["max_clean_drop"] - 1e-12
    if not qualifies:
        return f"no λ keeps clean accuracy within the limit, so the rule falls back to the largest ({deltas})"
    if beats(pick, served):
        verdict = f"**the pick measures better ({deltas}): a new bundle version with it is due**"
        if plain["clean"] >= pick["clean"] and plain["adversarial"] >= pick["adversarial"]:
            verdict += (
                f" (the plain model, no mixing: clean {100 * plain['clean']:.1f}, PGD "
                f"{100 * plain['adversarial']:.1f} %, measures better still)"
            )
        return verdict
    better = [r["lam"] for r in rows if beats(r, served)]
    if better:
        return (
            f"the pick does not beat the served λ ({deltas}), but λ {', '.join(f'{v:g}' for v in better)} does: "
            "**a new bundle version is due**"
        )
    dc, da = pick["clean"] - served["clean"], pick["adversarial"] - served["adversarial"]
    if max(abs(dc), abs(da)) <= one + 1e-9:  # a difference of one image is a tie (as in beats)
        why = "within one image"
    elif max(dc, da) > one:
        why = "the pick trades one axis for the other"
    else:
        why = "the pick gains no image on either axis"
    return f"no λ of the grid measures better than the served one ({deltas}, {why}): the served version stays"


def lambda_section(res: dict[str, Any]) -> list[str]:
    """The sweep's pick against the served λ, with the reason they differ (or the note that no sweep was run)."""
    out = ["## λ: the sweep's pick and the served parameters", ""]
    sweep = res.get("sweep")
    skipped = [s for s in res.get("companions_skipped", []) if str(SWEEP_FILE) in s]
    if not sweep:
        text = skipped[0] if skipped else "No sweep beside this report"
        return [*out, f"{text} (`mixinfer calibrate --bundle ... --sweep --sweep-out <report>/sweep`).", ""]
    mi = res["bundle"]["mi"]
    out += [
        f"`mixinfer calibrate --sweep` ({sweep['n_images']} calibration images, oblivious PGD ε {sweep['eps']:g}, "
        f"{sweep['steps']} steps, {len(sweep['seeds'])} seeds; rule: best PGD accuracy among the λ whose clean "
        f"accuracy is within {100 * sweep['max_clean_drop']:.0f} points of the plain model's "
        f"{100 * sweep['plain']['clean']:.1f} %, ties to the larger λ; when none is, the largest λ). Served values "
        "are the bundle's: SPEC's defaults (the paper's: λ_PL 0.5; stand-alone λ_OL 0.5 for mixup models, 0.6 for "
        "IAT models; MI-Combined's OL branch 0.4, the paper's CIFAR command) unless the version was derived with "
        "other λ (`mixinfer calibrate --new-version`"
        + (
            f"; this version was: from {src}, by `{res['bundle']['training'].get('recalibrated_by', '?')}`"
            if (src := (res["bundle"].get("training") or {}).get("derived_from"))
            else ""
        )
        + "); a difference of less than one image counts as a tie. "
        + (
            "The MI-Combined row varies only the λ of the OL branch that answers flagged inputs (threshold and PL "
            "branch as served)."
            if "combined" in sweep
            else f"This sweep predates the MI-Combined rows: MI-Combined's OL λ ({mi['ol_combined']['lam']}) is not "
            "swept."
        ),
        "",
        "| branch | served λ | clean / PGD at served (%) | sweep pick | clean / PGD at pick (%) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for branch in BRANCH_FIELD:
        if branch not in sweep:  # sweeps written before the MI-Combined rows
            continue
        lam = served_lam(mi, branch)
        rows, pick_lam = sweep[branch]["rows"], sweep[branch]["pick"]
        served, pick = _at(rows, lam), _at(rows, pick_lam)
        assert pick is not None, f"sweep pick {pick_lam} not among its rows"
        cell = f"{100 * served['clean']:.1f} / {100 * served['adversarial']:.1f}" if served else "–"
        verdict = "agree" if abs(pick_lam - lam) < 1e-9 else _verdict(served, pick, rows, sweep)
        out.append(
            f"| {BRANCH_LABEL[branch]} | {lam:g} | {cell} | {pick_lam:g} | "
            f"{100 * pick['clean']:.1f} / {100 * pick['adversarial']:.1f} | {verdict} |"
        )
    derived = derived_versions(res["bundle"])
    if derived:
        out += [
            "",
            "Derived from this version since (found beside it in the store when this report was written): "
            + "; ".join(derived)
            + ".",
        ]
    return [*out, "", "Plot: `sweep/sweep.png`.", ""]


def derived_versions(bundle: dict[str, Any]) -> list[str]:
    """The later versions in the store whose manifest says they were derived from this one, each with the swept λ
    it changed (``mnist-iat/2: MI-OL λ 0.8, MI-Combined (OL branch λ) λ 0.8``); none when the store is not at hand."""
    from service.errors import MixinferError
    from service.store import list_versions, load_bundle

    path = Path(bundle.get("path") or "")
    if not bundle.get("path") or not (path / "manifest.json").is_file():
        return []
    source = f"{bundle['name']}/{bundle['version']}"
    found = []
    for version in list_versions(path.parent.parent, bundle["name"]):
        try:
            manifest = load_bundle(path.parent / version).manifest
        except MixinferError:
            continue
        if (manifest.recipe.training or {}).get("derived_from") != source:
            continue
        mi = manifest.mi.model_dump(mode="json")
        changes = [
            f"{BRANCH_LABEL[b]} = {served_lam(mi, b):g}"
            for b in BRANCH_FIELD
            if abs(served_lam(mi, b) - served_lam(bundle["mi"], b)) > 1e-9
        ]
        found.append(f"`{manifest.name}/{manifest.version}` ({', '.join(changes) or 'no swept λ changed'})")
    return found


def plateau_line(res: dict[str, Any]) -> str:
    """One sanity-check bullet: whether each plateau attack converged, and its accuracy unbounded."""
    p = res.get("plateau")
    if not p or "attacks" not in p:
        skipped = [s for s in res.get("companions_skipped", []) if str(PLATEAU_FILE) in s]
        return (
            "- Plateau (steps, EOT draws, restarts doubled, image by image) and accuracy vs ε for the adaptive "
            f"attacks: {skipped[0] if skipped else 'not run beside this report'} (`mixinfer evaluate --plateau`)."
        )
    parts = []
    for name, r in p["attacks"].items():
        n = p["n_images"]
        newly = ", ".join(f"{k} {round(v * n)}" for k, v in r["newly_broken"].items())
        unbounded = r["accuracy_vs_eps"].get("1")
        tail = f"; unbounded ε: {100 * unbounded:.0f} %" if unbounded is not None else ""
        state = "plateaued" if r["plateaued"] else "**not plateaued**"
        parts.append(
            f"`{name}` {state} (robust at the base setting: {r['robust_at_base']} of {n} images; newly broken "
            f"images: {newly}{tail})"
        )
    return f"- Plateau on the first {p['n_images']} images (`plateau.md`, `plateau.png`): " + "; ".join(parts) + "."
