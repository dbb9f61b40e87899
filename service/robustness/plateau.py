"""Is the worst case converged? Attacks rerun with steps, EOT draws and restarts doubled, and across eps.

Sanity checks of Tramèr et al. 2020 and Carlini et al. 2019 ("On Evaluating Adversarial Robustness"): doubling
the steps, the EOT draws or the restarts of an attack must newly break at most 1 % of the images (compared image
by image, every image scored by the served engine under every seed), and accuracy must reach 0 % at a large eps
(an unbounded attack, eps 1, always succeeds unless something masks gradients). Runs the given attacks (the two
strongest of the report by default) at the budget's setting and with each knob doubled, and at a ladder of eps.

Output: ``plateau.json`` (per-image correctness of every run), ``plateau.md`` and ``plateau.png``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.mi.params import Mode
from service.robustness.attacks.core import quantize
from service.robustness.budgets import Budget
from service.robustness.cache import AttackCache, plateau_name
from service.robustness.evaluate import attack_generator
from service.robustness.plan import Context, attack_plan

LOGGER = logging.getLogger(__name__)

#: largest share of images a doubled knob may newly break for the attack to count as converged
PLATEAU_TOLERANCE = 0.01
#: the eps ladder of the accuracy-vs-eps curve of the adaptive attacks (MNIST scale; 1.0 = unbounded)
EPS_LADDER = (0.1, 0.2, 0.3, 0.5, 1.0)


def plateau_attack_error(name: str) -> str | None:
    """Why ``name`` cannot be plateaued (None: it can): only the untargeted adaptive attacks read every knob.

    Oblivious, transfer and black-box rows ignore EOT draws or restarts (a doubled run would equal the base run and
    "plateau" by construction), and targeted rows need their targets.
    """
    from service.robustness.budgets import THREATS, ThreatScale, get_budget
    from service.robustness.plan import ADAPTIVE

    ok = sorted(
        s.name.split("@")[0]
        for s in attack_plan(get_budget("quick"), THREATS[ThreatScale.MNIST])
        if s.group == ADAPTIVE and not s.targets
    )
    return None if name in ok else f"--plateau {name!r}: not an untargeted adaptive attack (one of {', '.join(ok)})"


def _robust(
    ctx: Context, name: str, run_key: str, x: torch.Tensor, y: torch.Tensor, *, attack_seed: int, cache: AttackCache
) -> np.ndarray:
    """Per-image MI-Combined correctness under every server seed for one attack configuration (cached per run)."""
    spec = next(s for s in attack_plan(ctx.budget, ctx.threat) if s.name == f"{name}@{ctx.threat.eps:.3g}")
    cached = cache.load(run_key, attack_seed)
    if cached is None:
        t0 = time.time()
        ctx.gen = attack_generator(attack_seed, spec.name)
        ctx.traces = []
        raw = spec.run(ctx, x, y).detach().to(torch.float32).cpu()
        cache.save(run_key, attack_seed, raw.numpy(), ctx.trace(), time.time() - t0)
    else:
        raw = torch.from_numpy(cached[0])
    adv = quantize(raw, x.cpu(), ctx.threat.eps).numpy()
    labels = ctx.scorer.score(adv, Mode.COMBINED).label
    robust = (labels == y.cpu().numpy()[None]).all(axis=0)
    LOGGER.info("plateau %s: accuracy %.3f (all seeds)", run_key, robust.mean())
    return robust


def run_plateau(
    ctx: Context,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: tuple[str, ...],
    *,
    attack_seed: int = 0,
    cache: AttackCache | None = None,
) -> dict[str, Any]:
    """Doubling and eps-ladder runs of ``attacks`` on MI-Combined; returns the JSON-ready results.

    Every run is cached (``cache``), so a stopped plateau resumes; the unbounded eps runs right after the doublings
    (the most telling check first), and the ladder's point at the headline eps is the base run itself.
    """
    cache = cache or AttackCache(None, {})
    base_budget, base_threat = ctx.budget, ctx.threat
    out: dict[str, Any] = {"tolerance": PLATEAU_TOLERANCE, "n_images": int(y.numel()), "attacks": {}}
    for name in attacks:
        knobs: dict[str, Budget] = {
            "base": base_budget,
            "steps x2": replace(
                base_budget, adaptive_steps=2 * base_budget.adaptive_steps, apgd_steps=2 * base_budget.apgd_steps
            ),
            "eot x2": replace(base_budget, eot=2 * base_budget.eot),
            "restarts x2": replace(base_budget, restarts=2 * base_budget.restarts),
        }
        robust: dict[str, list[bool]] = {}
        for knob, budget in knobs.items():
            ctx.budget, ctx.threat = budget, base_threat
            key = plateau_name(name, knob)
            robust[knob] = _robust(ctx, name, key, x, y, attack_seed=attack_seed, cache=cache).tolist()
        base = np.asarray(robust["base"])
        newly = {k: float((base & ~np.asarray(v)).mean()) for k, v in robust.items() if k != "base"}
        curve: dict[float, float] = {base_threat.eps: float(base.mean())}
        for eps in sorted(EPS_LADDER, key=lambda e: (e != max(EPS_LADDER), e)):
            if not np.isclose(eps, base_threat.eps):
                ctx.budget, ctx.threat = base_budget, replace(base_threat, eps=eps)
                curve[eps] = float(
                    _robust(
                        ctx, name, plateau_name(name, f"eps{eps:g}"), x, y, attack_seed=attack_seed, cache=cache
                    ).mean()
                )
        out["attacks"][name] = {
            "robust": robust,
            "robust_at_base": int(base.sum()),
            "newly_broken": newly,
            "plateaued": all(v <= PLATEAU_TOLERANCE for v in newly.values()),
            "accuracy_vs_eps": {f"{e:g}": curve[e] for e in sorted(curve)},
        }
    ctx.budget, ctx.threat = base_budget, base_threat
    return out


def plateau_for_bundle(
    bundle: Any,
    budget: Budget,
    attacks: tuple[str, ...],
    *,
    seeds: list[int],
    device: str = "cpu",
    n_images: int | None = None,
    eps: float | None = None,
    attack_seed: int = 0,
    cache_dir: Path | None = None,
    data_root: Path | None = None,
) -> dict[str, Any]:
    """Build the twin, the served scorer and the test subset of ``bundle``, then :func:`run_plateau`.

    ``n_images`` takes the first images of the report's subset (the subset is a seeded permutation, so a smaller
    count is a prefix of the report's images); ``eps`` is the headline eps (default: the threat model's).
    """
    from service.robustness.budgets import threat_for
    from service.robustness.data import load_split
    from service.robustness.pipeline import DifferentiableMI
    from service.robustness.served import ServedScorer

    mi = DifferentiableMI.from_bundle(bundle, device=device)
    threat = threat_for(bundle.manifest.input.shape)
    threat = replace(threat, eps=eps) if eps is not None else threat
    ctx = Context(mi, ServedScorer.from_bundle(bundle, seeds), budget, threat, attack_generator(attack_seed, "setup"))
    x_np, y_np, idx = load_split(bundle, "test", min(n_images or budget.n_images, budget.n_images), data_root)
    cache = AttackCache.for_run(cache_dir, bundle, budget, threat, idx)
    x, y = torch.from_numpy(x_np).to(mi.device), torch.from_numpy(y_np).to(mi.device)
    res = run_plateau(ctx, x, y, attacks, attack_seed=attack_seed, cache=cache)
    identity = {"name": bundle.manifest.name, "version": bundle.manifest.version, "files": bundle.manifest.files}
    return res | {
        "bundle": identity,
        "seeds": seeds,
        "budget": budget.as_dict(),
        "attack_seed": attack_seed,
        "eps": threat.eps,
        "test_indices": idx.tolist(),
    }


def _merged(res: dict[str, Any], path: Path) -> dict[str, Any]:
    """``res`` with the attacks of an earlier plateau run in ``path`` kept, when it ran on the same setting.

    Two processes (one attack each, one core each) can so write one plateau beside a report; a run on another
    setting (images, eps, seeds, budget) replaces the file.
    """
    if not path.exists():
        return res
    old = json.loads(path.read_text(encoding="utf-8"))
    same = ("bundle", "n_images", "eps", "seeds", "budget", "attack_seed", "tolerance", "test_indices")
    if any(old.get(k) != res.get(k) for k in same):
        return res
    return res | {"attacks": old["attacks"] | res["attacks"]}


def write_plateau(res: dict[str, Any], out_dir: Path, budget_text: str) -> list[Path]:
    """``plateau.json``, ``plateau.md`` and ``plateau.png`` (accuracy per knob and vs eps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    res = _merged(res, out_dir / "plateau.json")
    tmp = out_dir / "plateau.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "plateau.json")  # atomic: a reader never sees half a file
    lines = [
        "# Plateau and accuracy vs ε (MI-Combined, all seeds right)",
        "",
        f"_{budget_text}_; plateau runs on {res.get('n_images', '?')} images (the first of the report's subset), "
        f"headline ε {res.get('eps', '?')}; a doubled knob may newly break at most "
        f"{100 * res['tolerance']:.0f} % of the images (compared image by image; only images the base run leaves "
        "robust can be newly broken, so their count is what the check rests on).",
        "",
        "| attack | base acc (robust images) | newly broken, images: steps ×2 / EOT ×2 / restarts ×2 | plateaued | "
        "accuracy vs ε (%) |",
        "|---|---|---|---|---|",
    ]
    warnings = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in res["attacks"].items():
        nb = r["newly_broken"]
        curve = ", ".join(f"{e}: {100 * a:.0f}" for e, a in r["accuracy_vs_eps"].items())
        acc = {k: float(np.mean(v)) for k, v in r["robust"].items()}
        n = len(r["robust"]["base"])
        lines.append(
            f"| {name} | {100 * acc['base']:.1f} ({r['robust_at_base']} of {n}) | "
            + " / ".join(f"{round(v * n)}" for v in nb.values())
            + f" | {'yes' if r['plateaued'] else '**no**'} | {curve} |"
        )
        if r["accuracy_vs_eps"].get("1", 0.0) > 0:
            warnings.append(f"- ⚠ `{name}` leaves {100 * r['accuracy_vs_eps']['1']:.0f} % at unbounded ε: it is broken")
        ax1.plot(list(acc), [100 * v for v in acc.values()], "-o", label=name)
        ax2.plot([float(e) for e in r["accuracy_vs_eps"]], [100 * a for a in r["accuracy_vs_eps"].values()], "-o")
    ax1.set(ylabel="accuracy, all seeds (%)", title="doubling each knob")
    ax2.set(xlabel="ε", ylabel="accuracy, all seeds (%)", title="accuracy vs ε", ylim=(-2, 102))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "plateau.png", dpi=110)
    plt.close(fig)
    text = "\n".join([*lines, "", *warnings, "", "![plateau](plateau.png)", ""])
    (out_dir / "plateau.md").write_text(text, encoding="utf-8")
    return [out_dir / "plateau.json", out_dir / "plateau.md", out_dir / "plateau.png"]
