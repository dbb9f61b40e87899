"""The attacks of one evaluation (report order) and the context they run in.

Every adaptive attack runs with the budget's restarts and keeps, per image, its best iterate; each attack gets
its own generator (seeded from the run's attack seed and its name, recorded in ``results.json``) so that a rerun,
or a resumed run, reproduces it. Targeted rows receive the targets as their label argument.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.robustness.attacks import (
    apgd,
    baseline_eot,
    crosscheck,
    eot_combined,
    force_flagged,
    ol_direct,
    pgd,
    pl_aware,
    smooth_switch,
    square,
)
from service.robustness.baselines import BASELINES
from service.robustness.blackbox import DETAILS, query_fn
from service.robustness.budgets import Budget, ThreatModel
from service.robustness.pipeline import DifferentiableMI
from service.robustness.served import ServedScorer

LOGGER = logging.getLogger(__name__)

#: attack groups, in report order
OBLIVIOUS, TRANSFER, ADAPTIVE, BASELINE_EOT, BLACKBOX, CROSSCHECK = (
    "oblivious",
    "transfer",
    "adaptive",
    "baseline-eot",
    "black-box",
    "cross-check",
)
#: groups whose inputs know about MI (the "non-oblivious" worst case)
NON_OBLIVIOUS = (TRANSFER, ADAPTIVE, BLACKBOX, CROSSCHECK)

Run = Callable[["Context", torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Context:
    """Everything an attack needs; ``gen``, ``trace`` and ``progress`` are replaced for every attack."""

    mi: DifferentiableMI | None  #: None: no faithful twin (imported graph), black-box rows only
    scorer: ServedScorer
    budget: Budget
    threat: ThreatModel
    gen: np.random.Generator
    surrogate: Callable[[torch.Tensor], torch.Tensor] | None = None
    progress: Callable[[int], None] = field(default=lambda n: None)
    traces: list[list[float]] = field(default_factory=list)

    @property
    def twin(self) -> DifferentiableMI:
        """The differentiable twin (white-box rows only exist when there is one)."""
        assert self.mi is not None, "white-box attack without a differentiable twin"
        return self.mi

    def step(self, n: int) -> None:
        """Advance the current attack's progress bar (looked up at call time: bars change per attack)."""
        self.progress(n)

    def new_trace(self) -> list[float]:
        """A fresh loss-curve list for one batch (averaged over batches by :meth:`trace`)."""
        self.traces.append([])
        return self.traces[-1]

    def trace(self) -> list[float]:
        """The batch-averaged loss curve of the current attack."""
        curves = [t for t in self.traces if t]
        if not curves:
            return []
        n = min(len(t) for t in curves)
        return [float(v) for v in np.mean([t[:n] for t in curves], axis=0)]


@dataclass(frozen=True)
class AttackSpec:
    """One row of the report: how to build the adversarial inputs and what to score them with."""

    name: str
    group: str
    eps: float
    description: str
    run: Run
    targets: bool = False  #: the run receives the targets as labels (targeted attacks)
    baselines: bool = False  #: also score the input-transformation baselines


def batched(fn: Callable[[Context, torch.Tensor, torch.Tensor], torch.Tensor]) -> Run:
    """Run ``fn`` on batches of ``budget.attack_batch`` images."""

    def run(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bs = c.budget.attack_batch
        return torch.cat([fn(c, x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs)])

    return run


def step_for(step: float, eps: float, steps: int) -> float:
    """The threat model's step, raised to 2.5 eps / steps (Madry et al.'s rule) when too few steps could not
    otherwise cross the eps-ball (reduced budgets)."""
    return max(step, 2.5 * eps / steps)


def _pgd_row(
    name: str, group: str, eps: float, text: str, *, logits: str, label: str, steps: int, step: float
) -> AttackSpec:
    """Base-model (``logits`` = "base") or surrogate PGD; label = clean prediction, ground truth or target."""

    def fn(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = c.twin.logits if logits == "base" else c.surrogate
        assert f is not None
        lab = c.twin.logits(x).argmax(1).detach() if label == "pred" else y
        tgen = torch.Generator().manual_seed(int(c.gen.integers(2**31)))
        attack = pgd.pgd_targeted if label == "target" else pgd.pgd_untargeted
        restarts = c.budget.restarts if group == OBLIVIOUS else 1
        return attack(f, x, lab, eps=eps, step=step, steps=steps, restarts=restarts, gen=tgen, progress=c.step)

    return AttackSpec(name, group, eps, text, batched(fn), targets=label == "target", baselines=group == OBLIVIOUS)


def _adaptive_kw(c: Context) -> dict[str, Any]:
    """The budget's PGD settings of the adaptive attacks (eps, step, steps, EOT, restarts) and this batch's hooks."""
    b, t = c.budget, c.threat
    kw: dict[str, Any] = {"eps": t.eps, "step": step_for(t.adaptive_step, t.eps, b.adaptive_steps)}
    kw["steps"] = b.adaptive_steps
    return kw | {"eot": b.eot, "restarts": b.restarts, "progress": c.step, "trace": c.new_trace()}


def _adaptive_row(fn: Callable[..., torch.Tensor], targeted: bool = False) -> Run:
    def run(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kw = _adaptive_kw(c)
        if targeted:
            kw["targeted"] = True
        return fn(c.twin, x, y, gen=c.gen, **kw)

    return batched(run)


def _from_transfer(transfer_step: float) -> Run:
    """EOT-PGD through MI-Combined whose first restart starts where a transfer attack ends: PGD on the base model with
    the ``transfer`` row's recipe (its own random start, so not the very point that row scored).

    The attacks through MI that start at random can end weaker than transfer (MI's gradients are noisy, the base
    model's are not); this one follows MI's own gradient from a point that already fools the base model. Its best
    iterate is chosen on the EOT loss, so the served answer at its end can still be right where its start was
    wrong: the per-image worst case keeps the transfer row too."""

    def fn(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t = c.budget, c.threat
        tgen = torch.Generator().manual_seed(int(c.gen.integers(2**31)))
        start = pgd.pgd_untargeted(c.twin.logits, x, y, eps=t.eps, step=transfer_step, steps=b.transfer_steps, gen=tgen)
        return eot_combined.eot_pgd_combined(c.twin, x, y, gen=c.gen, start=start, **_adaptive_kw(c))

    return batched(fn)


def _apgd(loss: str) -> Run:
    def run(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = c.budget
        if loss == "ce":
            loss_fn = eot_combined.combined_loss(c.twin, c.gen)
        else:
            loss_fn = force_flagged.force_flagged_loss(c.twin, c.gen, kappa=10.0, margin=0.05)
        return apgd.apgd_eot(
            loss_fn, x, y, eps=c.threat.eps, steps=b.apgd_steps, eot=b.eot, gen=c.gen, restarts=b.restarts,
            progress=c.step, trace=c.new_trace(), draw_chunk=4,
        )  # fmt: skip

    return batched(run)


def _baseline_eot(key: str) -> Run:
    def run(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t = c.budget, c.threat
        return baseline_eot.baseline_eot_pgd(
            c.twin.logits, BASELINES[key], x, y, gen=c.gen, eps=t.eps, steps=b.adaptive_steps, eot=b.eot,
            step=step_for(t.adaptive_step, t.eps, b.adaptive_steps), restarts=b.restarts, progress=c.step,
            trace=c.new_trace(),
        )  # fmt: skip

    return batched(run)


def _square(detail: str) -> Run:
    def run(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # every query still gets fresh server draws, from a stream seeded by the attack's generator: a rerun
        # reproduces the attack (the scorer's own engine draws from OS entropy, like a server)
        view = query_fn(c.scorer.seeded_engine(int(c.gen.integers(2**31))), detail)
        x_adv = square.square_linf(
            lambda imgs: view(imgs).probs, x.cpu().numpy(), y.cpu().numpy(), eps=c.threat.eps,
            queries=c.budget.square_queries, votes=c.budget.square_votes, gen=c.gen, progress=c.step,
        )  # fmt: skip
        return torch.from_numpy(x_adv)

    return run


def square_specs(budget: Budget, threat: ThreatModel) -> list[AttackSpec]:
    """The score-based Square rows, one per response-detail level (need no gradients, no twin)."""
    b, e = budget, threat.eps
    specs = []
    for detail in DETAILS:
        text = (
            f"Square on the served MI-Combined, response detail `{detail}`, {b.square_queries} queries per image, "
            f"each decision on the mean of {b.square_votes} fresh queries"
        )
        specs.append(AttackSpec(f"square-{detail}@{e:.3g}", BLACKBOX, e, text, _square(detail)))
    return specs


def attack_plan(budget: Budget, threat: ThreatModel, *, twin: bool = True) -> list[AttackSpec]:
    """The attacks of one evaluation, in report order (``twin`` False: an imported graph without a faithful
    differentiable twin gets the black-box rows only)."""
    b, t, e = budget, threat, threat.eps
    if not twin:
        return square_specs(budget, threat)
    specs: list[AttackSpec] = []
    for eps in t.eps_curve:
        s = step_for(t.step, eps, b.oblivious_steps)
        for which, what in (("pred", "the clean prediction (paper)"), ("gt", "the ground truth")):
            text = f"oblivious PGD on the base model, {b.oblivious_steps} steps of {s:.3g}, label = {what}"
            row = _pgd_row(
                f"pgd-{which}@{eps:.3g}",
                OBLIVIOUS,
                eps,
                text,
                logits="base",
                label=which,
                steps=b.oblivious_steps,
                step=s,
            )
            specs.append(row)
    s_obl, s_tr = step_for(t.step, e, b.oblivious_steps), step_for(t.step, e, b.transfer_steps)
    text = f"oblivious targeted PGD (random other class) on the base model, {b.oblivious_steps} steps of {s_obl:.3g}"
    specs.append(
        _pgd_row(
            f"pgd-targeted@{e:.3g}",
            OBLIVIOUS,
            e,
            text,
            logits="base",
            label="target",
            steps=b.oblivious_steps,
            step=s_obl,
        )
    )
    text = f"transfer: PGD on the base model, {b.transfer_steps} steps of {s_tr:.3g}, ground-truth label, then MI"
    specs.append(
        _pgd_row(f"transfer@{e:.3g}", TRANSFER, e, text, logits="base", label="gt", steps=b.transfer_steps, step=s_tr)
    )
    text = (
        f"transfer from an independently trained surrogate (LeNet-style, seed 1234, {b.surrogate_epochs} epochs), "
        f"PGD {b.transfer_steps} steps of {s_tr:.3g}"
    )
    name = f"transfer-surrogate@{e:.3g}"
    specs.append(_pgd_row(name, TRANSFER, e, text, logits="surrogate", label="gt", steps=b.transfer_steps, step=s_tr))
    steps_txt = (
        f"{b.adaptive_steps} steps of {step_for(t.adaptive_step, e, b.adaptive_steps):.3g}, EOT {b.eot}, "
        f"{b.restarts} restart(s), best iterate per image"
    )
    adaptive: list[tuple[str, Callable[..., torch.Tensor], str]] = [
        ("eot-combined", eot_combined.eot_pgd_combined, "EOT-PGD through the full MI-Combined pipeline"),
        ("pl-aware", pl_aware.pl_aware_pgd, "keep-unflagged: fool MI-PL, gap kept under the threshold"),
        ("force-flagged", force_flagged.force_flagged_pgd, "force-flagged: gap pushed above τ, OL fooled"),
        ("smooth-switch", smooth_switch.smooth_switch_pgd, "sigmoid((g − τ)/T) mix of the branches, T 0.1→0.005"),
        ("ol-direct", ol_direct.ol_direct_pgd, "direct EOT-PGD on the MI-OL branch (Tramèr et al.)"),
        ("ol-standalone", _ol_standalone, "direct EOT-PGD on the stand-alone MI-OL mode"),
    ]
    for name, fn, what in adaptive:
        specs.append(AttackSpec(f"{name}@{e:.3g}", ADAPTIVE, e, f"{what}, {steps_txt}", _adaptive_row(fn)))
    text = (
        f"EOT-PGD through MI-Combined warm-started where a transfer attack ends (PGD on the base model, "
        f"{b.transfer_steps} steps of {s_tr:.3g}, ground-truth label, its own random start), {steps_txt}"
    )
    specs.append(AttackSpec(f"eot-combined-from-transfer@{e:.3g}", ADAPTIVE, e, text, _from_transfer(s_tr)))
    apgd_txt = (
        f"APGD-EOT (own implementation, Croce & Hein 2020), {b.apgd_steps} steps, EOT {b.eot}, {b.restarts} restart(s)"
    )
    specs.append(AttackSpec(f"apgd-eot@{e:.3g}", ADAPTIVE, e, f"{apgd_txt}, CE through MI-Combined", _apgd("ce")))
    specs.append(AttackSpec(f"apgd-force-flagged@{e:.3g}", ADAPTIVE, e, f"{apgd_txt}, force-flagged loss", _apgd("ff")))
    if b.targeted_adaptive:
        for name, fn, what in adaptive[:4]:
            text = f"targeted (random other class) {what}, {steps_txt}"
            run = _adaptive_row(fn, targeted=True)
            specs.append(AttackSpec(f"{name}-targeted@{e:.3g}", ADAPTIVE, e, text, run, targets=True))
    for key in BASELINES:
        text = f"EOT-PGD through the {key} baseline's randomness, {steps_txt}"
        specs.append(AttackSpec(f"eot-{key}@{e:.3g}", BASELINE_EOT, e, text, _baseline_eot(key), baselines=True))
    specs += square_specs(budget, threat)
    if b.run_autoattack:
        text = "torchattacks AutoAttack(version='rand'): APGD-CE + APGD-DLR, 10 steps, EOT 20, through MI-Combined"
        specs.append(AttackSpec(f"autoattack-rand@{e:.3g}", CROSSCHECK, e, text, _autoattack))
    return specs


def _autoattack(c: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    bs = c.budget.attack_batch
    parts = [crosscheck.autoattack_rand(c.twin, x[i : i + bs], y[i : i + bs], eps=c.threat.eps, gen=c.gen)
             for i in range(0, x.shape[0], bs)]  # fmt: skip
    return torch.cat(parts)


def _ol_standalone(mi: DifferentiableMI, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> torch.Tensor:
    """The direct OL attack on the stand-alone MI-OL mode's parameters instead of the Combined branch's."""
    return ol_direct.ol_direct_pgd(mi, x, y, ol_spec=mi.params.ol_standalone, **kw)
