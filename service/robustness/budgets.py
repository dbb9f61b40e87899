"""Named, numeric evaluation budgets (SPEC section 9): every number in a report states the budget it ran with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum


class ThreatScale(StrEnum):
    """Which epsilon convention applies: MNIST-sized (eps 0.3) or CIFAR-sized (eps 8/255) images."""

    MNIST = "mnist"
    CIFAR = "cifar"


@dataclass(frozen=True)
class Budget:
    """Every knob of one evaluation run.

    Attributes:
        name: ``quick`` (tests), ``cpu`` (the committed reports: 32 images, within 90 minutes on 2 CPU cores),
            ``paper`` (SPEC section 9.3 minimums).
        n_images: test images attacked: a fixed, seeded random subset of the bundle's test split
            (:func:`service.robustness.data.load_split`; its indices are recorded in ``results.json``).
        oblivious_steps: PGD steps of the oblivious (base-model) attacks.
        transfer_steps: PGD steps of the transfer check (base model, many steps, then scored through MI).
        adaptive_steps: PGD steps of every adaptive attack (through MI, and through the baselines' randomness).
        eot: independent pipeline draws averaged per gradient step (EOT).
        restarts: random restarts of every PGD and APGD attack (the best iterate over all of them is kept per image).
        square_queries: queries per image of the score-based Square attack on the served engine, spent to the end.
        square_votes: fresh queries averaged per Square decision (one query can be lucky under MI's randomness).
        seeds: fresh server seeds each final adversarial input is scored with (broken if any is wrong).
        baseline_draws: random draws averaged by the input-transformation baselines.
        apgd_steps: steps of the own APGD-EOT (torchattacks' AutoAttack 'rand' keeps its own 10 steps, EOT 20).
        run_autoattack: run torchattacks' ``AutoAttack(version='rand')`` as a cross-check (20 EOT draws: expensive).
        targeted_adaptive: also run the adaptive attacks through MI targeted (random other class), per branch.
        surrogate_epochs: training epochs of the independent surrogate of the transfer attack.
        attack_batch: images per attack batch (bounds memory: batch x eot x N mixes per backward).
    """

    name: str
    n_images: int
    oblivious_steps: int
    transfer_steps: int
    adaptive_steps: int
    eot: int
    restarts: int
    square_queries: int
    square_votes: int
    seeds: int
    baseline_draws: int
    apgd_steps: int
    run_autoattack: bool
    targeted_adaptive: bool
    surrogate_epochs: int
    attack_batch: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self, n_images: int | None = None) -> str:
        """One line stated next to every number of a report (``n_images``: the images actually attacked)."""
        return (
            f"budget `{self.name}`: {n_images or self.n_images} test images, oblivious PGD {self.oblivious_steps} "
            f"steps, adaptive PGD {self.adaptive_steps} steps x EOT {self.eot} x {self.restarts} restart(s) (best "
            f"iterate per image), APGD-EOT {self.apgd_steps} steps, Square {self.square_queries} queries "
            f"(decisions on the mean of {self.square_votes}), {self.seeds} server seeds, baselines "
            f"{self.baseline_draws} draws"
        )


@dataclass(frozen=True)
class ThreatModel:
    """L-inf threat model in [0, 1] pixel units.

    Attributes:
        eps: the headline radius of the adaptive attacks (0.3 MNIST, 8/255 CIFAR).
        eps_curve: radii of the oblivious accuracy-vs-eps curve.
        step: PGD step of the oblivious attacks (0.01 MNIST, 2/255 CIFAR).
        adaptive_step: PGD step of the adaptive attacks (0.01 MNIST, 1/255 CIFAR).
    """

    eps: float
    eps_curve: tuple[float, ...]
    step: float
    adaptive_step: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


#: SPEC 9.3 minimums are `paper`. `cpu` is the budget of the committed reports: 32 images, 100 adaptive steps x EOT 8,
#: 1 restart, Square 1,000 queries (decisions on the mean of 4), sized so that one report (about 20 attacks, most of the
#: time in the OL and switch attacks: 8 draws x 20-30 blends per image per step) finishes within 90 minutes on 2 CPU
#: cores; the run time of each report is in its header. Its gradients are cheap on any CUDA GPU (`--device cuda`),
#: where `--n-images` can go up to the test split.
BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        name="quick",
        n_images=20,
        oblivious_steps=5,
        transfer_steps=10,
        adaptive_steps=3,
        eot=2,
        restarts=1,
        square_queries=20,
        square_votes=2,
        seeds=3,
        baseline_draws=2,
        apgd_steps=3,
        run_autoattack=False,
        targeted_adaptive=True,
        surrogate_epochs=1,
        attack_batch=20,
    ),
    "cpu": Budget(
        name="cpu",
        n_images=32,
        oblivious_steps=100,
        transfer_steps=200,
        adaptive_steps=100,
        eot=8,
        restarts=1,
        square_queries=1000,
        square_votes=4,
        seeds=3,
        baseline_draws=20,
        apgd_steps=100,
        run_autoattack=True,
        targeted_adaptive=True,
        surrogate_epochs=5,
        attack_batch=25,
    ),
    "paper": Budget(
        name="paper",
        n_images=1000,
        oblivious_steps=200,
        transfer_steps=1000,
        adaptive_steps=200,
        eot=16,
        restarts=5,
        square_queries=5000,
        square_votes=8,
        seeds=5,
        baseline_draws=50,
        apgd_steps=200,
        run_autoattack=True,
        targeted_adaptive=True,
        surrogate_epochs=10,
        attack_batch=64,
    ),
}

THREATS: dict[ThreatScale, ThreatModel] = {
    ThreatScale.MNIST: ThreatModel(eps=0.3, eps_curve=(0.1, 0.2, 0.3), step=0.01, adaptive_step=0.01),
    ThreatScale.CIFAR: ThreatModel(
        eps=8 / 255, eps_curve=(2 / 255, 4 / 255, 8 / 255), step=2 / 255, adaptive_step=1 / 255
    ),
}


def get_budget(name: str, **overrides: int | bool) -> Budget:
    """The named budget, with optional numeric overrides (each one is then part of the recorded budget).

    Raises:
        ValueError: unknown name or override.
    """
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}, expected one of {sorted(BUDGETS)}")
    budget = BUDGETS[name]
    if overrides:
        budget = replace(budget, **overrides)  # type: ignore[arg-type]
    if budget.n_images < 1 or budget.seeds < 1 or budget.eot < 1 or budget.restarts < 1:
        raise ValueError(f"budget {budget.name!r}: n_images, seeds, eot and restarts must be >= 1, got {budget}")
    return budget


def threat_for(input_shape: tuple[int, int, int]) -> ThreatModel:
    """MNIST conventions for 1-channel images up to 28x28, CIFAR conventions otherwise (SPEC 9.1/9.3)."""
    c, h, w = input_shape
    scale = ThreatScale.MNIST if c == 1 and max(h, w) <= 28 else ThreatScale.CIFAR
    return THREATS[scale]
