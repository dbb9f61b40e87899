"""Closed choices and per-model Mixup Inference parameters (they travel with the bundle's manifest)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Mode(StrEnum):
    """Which inference the caller asks for."""

    COMBINED = "combined"  #: MI-PL, switching to MI-OL when the detection gap reaches the threshold (default)
    PL = "pl"  #: MI with partners from the predicted label only
    OL = "ol"  #: MI with partners from the other labels only (stand-alone parameters)
    OFF = "off"  #: the plain, undefended prediction


class Branch(StrEnum):
    """Which branch actually answered for one image."""

    PL = "pl"
    OL = "ol"
    OFF = "off"


class MixSpec(BaseModel):
    """One mixing branch: input weight ``lam`` (0 < lam <= 1) and number of blends ``n`` (>= 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lam: float = Field(gt=0.0, le=1.0, description="weight of the INPUT in each blend: lam*x + (1-lam)*s")
    n: int = Field(ge=1, le=4096, description="number of blends averaged per input")


class MIParams(BaseModel):
    """Mixup Inference parameters of one model (SPEC section 4.4 defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lam_pl: float = Field(0.5, gt=0.0, le=1.0, description="input weight of the MI-PL blends")
    n_pl: int = Field(5, ge=1, le=4096, description="number of MI-PL blends")
    threshold: float = Field(0.2, ge=0.0, le=1.0, description="flag iff gap >= threshold (MI-Combined)")
    threshold_rule: str = Field(
        "fixed=0.2",
        min_length=1,
        description="how the threshold was chosen, e.g. 'target_fpr=0.05' or 'fixed=0.2'",
    )
    ol_combined: MixSpec = Field(
        MixSpec(lam=0.4, n=15), description="MI-OL branch used by MI-Combined for flagged inputs"
    )
    ol_standalone: MixSpec = Field(MixSpec(lam=0.5, n=30), description="stand-alone MI-OL (mode 'ol')")
