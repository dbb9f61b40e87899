"""Write an evaluation's ``results.json``, ``report.md`` and matplotlib plots; every table states its budget."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.robustness import companions, metrics

LOGGER = logging.getLogger(__name__)

DEFENCES = ("off", "pl", "ol", "combined")
DEFENCE_NAMES = {"off": "base model", "pl": "MI-PL", "ol": "MI-OL", "combined": "MI-Combined"}
BASELINE_NAMES = {
    "gaussian": "Gaussian noise",
    "rotation": "rotation",
    "crop_pad": "crop+pad",
    "crop_resize": "crop+resize",
}
PLOTS = ("accuracy_vs_eps.png", "gap_histogram.png", "gap_roc.png", "attacks.png", "loss_curves.png")
GROUPS = (
    ("oblivious", "Oblivious attacks (the paper's protocol: PGD on the base model, then each defence)", True),
    ("transfer", "Transfer: the base model's own gradients, and an independently trained surrogate", False),
    ("adaptive", "Adaptive attacks (white box through MI: every decision, both directions, targeted too)", False),
    ("baseline-eot", "The input-transformation baselines attacked adaptively (EOT through their randomness)", True),
    ("black-box", "Score-based black box on the served outputs (both response-detail levels)", False),
    ("cross-check", "Cross-checks with torchattacks", False),
)


def _ci(ci: Any) -> str:
    return f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else ""


def _pct(stats: dict[str, Any] | None, worst: bool = True) -> str:
    """``mean ± std (all seeds [95 % CI])`` for accuracies over seeds, ``mean ± std`` for rates."""
    if stats is None:
        return "–"
    text = f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    if worst and stats.get("worst") is not None and len(stats.get("per_seed", [])) > 1:
        text += f" ({100 * stats['worst']:.1f}{_ci(stats.get('ci'))})"
    elif worst and stats.get("worst") is not None:
        text = f"{100 * stats['worst']:.1f}{_ci(stats.get('ci'))}"
    return text


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)


def _attack_table(rows: list[dict[str, Any]], with_baselines: bool) -> list[str]:
    cols = [DEFENCE_NAMES[d] for d in DEFENCES]
    if with_baselines:
        cols += list(BASELINE_NAMES.values())
    lines = [
        "| attack | ε | images | "
        + " | ".join(cols)
        + " | flagged (all / base fooled) | AUROC gap (all / successful) | attack s |",
        "|---" * (len(cols) + 6) + "|",
    ]
    for r in rows:
        acc = [_pct(r["accuracy"].get(d)) for d in DEFENCES]
        if with_baselines:
            acc += [_pct(r["accuracy"].get(k), worst=False) for k in BASELINE_NAMES]
        flag = f"{_pct(r['flag_rate'], False)} / {_pct(r['flag_rate_base_fooled'], False)}"
        lines.append(
            f"| {r['name'].split('@')[0]} | {r['eps']:.3g} | {r['n_images']} | "
            + " | ".join(acc)
            + f" | {flag} | {_num(r['gap_auroc'])} / {_num(r.get('gap_auroc_successful'))}"
            + f" | {_attack_time(r)} |"
        )
    return lines


def _attack_time(r: dict[str, Any]) -> str:
    """Seconds the attack ran; a resumed row shows the seconds of the run that made its cache entry."""
    if r.get("attack_seconds") is None:
        return "– (resumed; time not recorded)"
    return f"{r['attack_seconds']:.0f}{' (resumed)' if r.get('resumed') else ''}"


def _where(env: dict[str, Any] | None) -> str:
    """Where the gradients and the scores were computed (reports written before this was recorded say less)."""
    if not env:
        return "torch twin on the CPU"
    twin = f"{env['torch_device']} ({env['gpu']})" if env.get("gpu") else env["torch_device"]
    return (
        f"torch {env['torch']} twin on {twin}, scoring by onnxruntime {env['onnxruntime']} ({env['scoring']}), "
        f"host {env['host']}"
    )


def _imported_lines(res: dict[str, Any]) -> list[str]:
    """What an imported bundle's report must say: the source model, its training data, black-box only."""
    imp = res["bundle"].get("imported")
    if not imp:
        return []
    out = [
        f"- Imported model (`mixinfer import` of `{imp['source_file']}`, sha256 {imp['source_sha256'][:12]}…): "
        f"{imp['training_data']}."
    ]
    if res.get("blackbox_only"):
        out.append(f"- **{res['blackbox_only']}**; the white-box rows are absent.")
    return out


def render_markdown(res: dict[str, Any]) -> str:
    """The human report (tables in percent; MI numbers are mean ± std over server seeds, then all-seeds)."""
    b, t = res["bundle"], res["threat"]
    mi = b["mi"]
    rows = res["attacks"]
    out = [
        f"# Robustness report: `{b['name']}/{b['version']}` ({b['architecture']}, {b['dataset']})",
        "",
        f"- **{res['budget_text']}**",
        f"- Threat model: L∞, headline ε = {t['eps']:.3g} (curve {', '.join(f'{e:.3g}' for e in t['eps_curve'])}), "
        f"oblivious step {t['step']:.3g}, adaptive step {t['adaptive_step']:.3g}, pixels in [0, 1].",
        f"- Served parameters (from the manifest): λ_PL {mi['lam_pl']}, N_PL {mi['n_pl']}, threshold {mi['threshold']} "
        f"({mi['threshold_rule']}), OL in Combined λ {mi['ol_combined']['lam']} N {mi['ol_combined']['n']}, "
        f"stand-alone OL λ {mi['ol_standalone']['lam']} N {mi['ol_standalone']['n']}.",
        f"- Scoring: every adversarial input is rounded to 8-bit pixels and run through the served ONNX engine under "
        f"{len(res['seeds'])} fresh server seeds ({', '.join(str(s) for s in res['seeds'])}). Cells read "
        "`mean ± std over seeds (all seeds right)`; the last figure counts an image only if every seed classified "
        "it correctly. Baselines average the softmax over random transforms.",
        f"- Runtime {res['runtime_seconds'] / 60:.1f} min; {_where(res.get('environment'))}; created {res['created']}.",
        *_imported_lines(res),
        "",
        "## Clean accuracy (%)",
        "",
        "| defence | accuracy | flag rate |",
        "|---|---|---|",
    ]
    clean = res["clean"]
    for d in DEFENCES:
        flag = _pct(clean["flag_rate"], False) if d == "combined" else "–"
        out.append(f"| {DEFENCE_NAMES[d]} | {_pct(clean['accuracy'][d])} | {flag} |")
    for k, name in BASELINE_NAMES.items():
        if k in clean["accuracy"]:  # no baselines without a differentiable twin
            out.append(f"| {name} | {_pct(clean['accuracy'][k], False)} | – |")
    for group, title, with_baselines in GROUPS:
        sel = [r for r in rows if r["group"] == group]
        if not sel:
            continue
        out += ["", f"## {title}: accuracy (%)", "", f"_{res['budget_text']}_", ""]
        out += _attack_table(sel, with_baselines)
    out += [
        "",
        f"## Per-image worst case at ε = {t['eps']:.3g} (%)",
        "",
        "An image counts as robust only if it survives every attack below under every server seed; [95 % "
        "Clopper–Pearson interval over the images]. 8-bit: the inputs rounded to 8-bit pixels (PNG clients); "
        "float32: the unrounded inputs (tensor clients, OIP/JSON). Non-oblivious: the attacks that know the "
        f"defence (for the baselines: their EOT row). _{res['budget_text']}_",
        "",
        "| defence | all attacks, 8-bit | all attacks, float32 | non-oblivious only, 8-bit |",
        "|---|---|---|---|",
    ]
    for d, w in res["worst_case"].items():
        name = DEFENCE_NAMES.get(d, BASELINE_NAMES.get(d, d))
        flt = f"{100 * w['all_attacks_float']:.1f}{_ci(w['all_attacks_float_ci'])}" if "all_attacks_float" in w else "–"
        out.append(
            f"| {name} | {100 * w['all_attacks']:.1f}{_ci(w.get('all_attacks_ci'))} | {flt} | "
            f"{100 * w['non_oblivious']:.1f} |"
        )
    out += ["", f"Attacks: {', '.join(res['worst_case']['combined']['attacks'])}.", ""]
    out += _sanity_section(res)
    out += companions.lambda_section(res)
    out += [
        "## Robustness Improving Condition (empirical)",
        "",
        "On adversarial inputs the base model gets wrong: does MI raise the true class's probability and lower the "
        "adversarial class's (both > 0 is what the paper's condition needs)? Probabilities averaged over seeds.",
        "",
        "| attack | n | MI-PL: true ↑ / adv ↓ / holds | MI-OL: true ↑ / adv ↓ / holds | "
        "MI-Combined: true ↑ / adv ↓ / holds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if abs(r["eps"] - t["eps"]) > 1e-12:
            continue
        cells = []
        for m in ("pl", "ol", "combined"):
            ric = r["ric"][m]
            up, down = _num(ric["true_up"], "{:+.3f}"), _num(ric["adv_down"], "{:+.3f}")
            cells.append(f"{up} / {down} / {_num(ric['holds'], '{:.2f}')}")
        out.append(f"| {r['name'].split('@')[0]} | {r['ric']['combined']['n']} | " + " | ".join(cells) + " |")
    targeted = [r for r in rows if "target_success" in r]
    if targeted:
        out += ["", "## Targeted attack: success rate (%) (target hit under any seed)", ""]
        out += ["| attack | " + " | ".join(DEFENCE_NAMES[d] for d in DEFENCES) + " |", "|---" * 5 + "|"]
        for r in targeted:
            ts = r["target_success"]
            out.append(f"| {r['name']} | " + " | ".join(f"{100 * ts[d]:.1f}" for d in DEFENCES) + " |")
    out += ["", "## Checks", ""]
    out += [f"- ⚠ {w}" for w in res["warnings"]] or ["- no warnings"]
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in PLOTS] + [""]
    return "\n".join(out)


def _sanity_section(res: dict[str, Any]) -> list[str]:
    """Direction checks of the switch attacks, loss curves in numbers, and what the evaluation did not cover."""
    rows = {r["name"].split("@")[0]: r for r in res["attacks"]}
    out = ["## Sanity checks", ""]
    for name, want in (("force-flagged", "should be high"), ("pl-aware", "should be low"), ("apgd-force-flagged", "")):
        if name in rows:
            out.append(
                f"- `{name}` flag rate of MI-Combined on its inputs: {_pct(rows[name]['flag_rate'], False)} % "
                f"({want or 'routes into OL'}; clean: {_pct(res['clean']['flag_rate'], False)} %)."
            )
    curves = [(n, r["trace"]) for n, r in rows.items() if r.get("trace")]
    if curves:
        out.append(
            "- Loss curves (mean objective over images; first → best-of-run → last iterate; plot "
            "`loss_curves.png`): "
            + "; ".join(f"`{n}` {t[0]:.2f} → {max(t):.2f} → {t[-1]:.2f}" for n, t in curves)
            + "."
        )
    out.append(companions.plateau_line(res))
    return [*out, ""]


def _plot_loss_curves(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for r in res["attacks"]:
        if r.get("trace"):
            ax.plot(r["trace"], label=r["name"].split("@")[0], linewidth=1.2)
    ax.set(
        xlabel="iterate (restarts concatenated)",
        ylabel="mean objective (maximised)",
        title=f"Loss curves ({res['budget_text'].split(':')[0]})",
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """Accuracy vs eps per defence, gap histograms with the threshold, ROC of the gap, attacks bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out_dir / p for p in PLOTS]
    rows, t, tau = res["attacks"], res["threat"], res["bundle"]["mi"]["threshold"]
    budget = f"budget {res['budget']['name']}, {res['budget']['n_images']} images"

    # accuracy vs eps (oblivious PGD: per eps the worse of the two label cells, pgd-pred and pgd-gt; all seeds)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    eps_values = [0.0, *t["eps_curve"]]
    for key, name in [*DEFENCE_NAMES.items(), *BASELINE_NAMES.items()]:
        if key not in res["clean"]["accuracy"]:  # baselines need the twin
            continue
        ys = [res["clean"]["accuracy"][key]["worst"]]
        for eps in t["eps_curve"]:
            accs = [
                r["accuracy"][key]["worst"]
                for r in rows
                if r["group"] == "oblivious" and r["eps"] == eps and "targeted" not in r["name"]
            ]
            ys.append(min(accs) if accs else np.nan)
        style = "-o" if key in DEFENCE_NAMES else "--."
        ax.plot(eps_values, [100 * v for v in ys], style, label=name)
    ax.set(xlabel="ε (L∞, [0,1] pixels)", ylabel="accuracy (%)", title=f"Oblivious PGD ({budget})", ylim=(-2, 102))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    # gap histograms
    clean_gap = np.asarray(res["clean_gap"], dtype=float)
    headline = [r for r in rows if abs(r["eps"] - t["eps"]) < 1e-12 and r["group"] != "cross-check"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    shown = [
        np.asarray(r["gap"], dtype=float)
        for r in headline
        if r["name"].startswith(("pgd-gt", "eot-combined", "pl-aware"))
    ]
    lo = min([-0.1, float(np.nanmin(clean_gap))] + [float(np.nanmin(g)) for g in shown if np.isfinite(g).any()])
    finite = [float(np.nanmax(g)) for g in [clean_gap, *shown] if np.isfinite(g).any()]
    hi = max([tau * 1.5, *finite]) + 0.02
    bins = np.linspace(lo, hi, 45).tolist()
    ax.hist(clean_gap[np.isfinite(clean_gap)], bins=bins, alpha=0.6, density=True, label="clean")
    for r in headline:
        if r["name"].startswith(("pgd-gt", "eot-combined", "pl-aware")):
            g = np.asarray(r["gap"], dtype=float)
            ax.hist(g[np.isfinite(g)], bins=bins, histtype="step", linewidth=1.6, density=True, label=r["name"])
    ax.axvline(tau, color="k", linestyle=":", label=f"threshold {tau:.3g}")
    ax.set(xlabel="detection gap g = c − max q_PL", ylabel="density", title=f"Detection gap ({budget})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    # ROC of the gap
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    for r in headline:
        fpr, tpr = metrics.roc_curve(clean_gap[np.isfinite(clean_gap)], np.asarray(r["gap"], dtype=float))
        ax.plot(fpr, tpr, label=f"{r['name'].split('@')[0]} (AUROC {_num(r['gap_auroc'], '{:.2f}')})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(
        xlabel="false-positive rate (clean)",
        ylabel="true-positive rate (adversarial)",
        title=f"ROC of the gap ({budget})",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)

    # accuracy per attack at the headline eps, per served defence (all seeds)
    at_eps = [r for r in rows if abs(r["eps"] - t["eps"]) < 1e-12]
    fig, ax = plt.subplots(figsize=(8.0, 4.4))
    width = 0.2
    xs = np.arange(len(at_eps))
    for i, d in enumerate(DEFENCES):
        ax.bar(xs + (i - 1.5) * width, [100 * r["accuracy"][d]["worst"] for r in at_eps], width, label=DEFENCE_NAMES[d])
    ax.set_xticks(xs, [r["name"].split("@")[0] for r in at_eps], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="accuracy, all seeds (%)", title=f"Attacks at ε = {t['eps']:.3g} ({budget})", ylim=(0, 100))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[3], dpi=110)
    plt.close(fig)
    _plot_loss_curves(res, paths[4])
    return paths


def write_report(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``; returns the paths written.

    The sweep and plateau files already in ``out_dir`` are folded in (:mod:`companions`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    res = companions.attach(res, out_dir)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    plots = make_plots(res, out_dir)
    (out_dir / "report.md").write_text(render_markdown(res), encoding="utf-8")
    LOGGER.info("wrote %s", out_dir)
    return [out_dir / "results.json", out_dir / "report.md", *plots]


def main(argv: list[str] | None = None) -> int:
    """``python -m service.robustness.report DIR [DIR ...]``: re-render reports from their results.json.

    Picks up a sweep or plateau run added beside a report after it was written; no attack runs again.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.robustness.report", description=main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="report directories (each with results.json)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for d in parser.parse_args(argv).dirs:
        write_report(json.loads((d / "results.json").read_text(encoding="utf-8")), d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
