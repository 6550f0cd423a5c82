"""When ``straighten`` turns a photo: the decision rule applied to each estimate.

A photo is rotated only when the estimate is sure enough (confidence >= ``min_confidence``) and the tilt
is large enough to change the picture (>= ``min_angle``; by default the angle at which the photo's crop
changes by one pixel, so that a rotation that would only resample the photo is not made). Every other
photo is kept, with the reason. The default threshold is the one recorded in the model file (chosen on
validation photos when the model was made); ``DecisionRule.always()`` acts on every estimate.
``rule_outcome`` measures what a rule does to upright and tilted photos, ``choose_min_confidence`` picks
the threshold that keeps both harms under a limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .geometry import crop_size
from .metrics import circular_error

ROTATED, KEPT = "rotated", "kept"
UNSURE = "kept: confidence"  # how the reason of a photo kept for a low confidence starts
MODEL_KEY = "min_confidence"  # the model file's config key of its chosen threshold


def one_pixel_angle(width: int, height: int, crop: str = "max_area") -> float:
    """Degrees of tilt below which ``crop`` of a width x height photo keeps its size to within one pixel:
    the fix would only resample the photo (for max_area about 1 / long side radians)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")

    def changes(angle: float) -> bool:
        w, h = crop_size(width, height, angle, crop)
        return max(abs(w - width), abs(h - height)) >= 1.0

    if crop == "same" or not changes(45.0):
        return 0.0  # the crop keeps the size: any tilt is a change
    lo, hi = 0.0, 45.0
    for _ in range(40):  # bisection to ~4e-11 degrees
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if changes(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class Decision:
    action: str  # ROTATED or KEPT
    reason: str  # e.g. 'kept: confidence 0.62 < 0.85'


@dataclass(frozen=True)
class DecisionRule:
    """Rotate when confidence >= ``min_confidence`` and |tilt| >= ``min_angle`` (degrees; None: the
    photo's one-pixel angle for the crop in use)."""

    min_confidence: float = 0.0
    min_angle: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.min_confidence <= 1.0 or math.isnan(self.min_confidence):
            raise ValueError(f"min confidence must be in [0, 1], got {self.min_confidence}")
        if self.min_angle is not None and not self.min_angle >= 0.0:
            raise ValueError(f"min angle must be >= 0 degrees, got {self.min_angle}")

    @classmethod
    def always(cls, min_angle: float | None = None) -> DecisionRule:
        """Act on every estimate, however unsure (tilts below ``min_angle`` are still kept)."""
        return cls(0.0, min_angle)

    @classmethod
    def for_model(cls, config: dict, min_confidence: float | None = None,
                  min_angle: float | None = None) -> DecisionRule:
        """The rule a model file recommends (its recorded threshold; 0 when it records none), with the
        given values taking precedence."""
        if min_confidence is None:
            min_confidence = float(config.get(MODEL_KEY) or 0.0)
        return cls(min_confidence, min_angle)

    def describe(self) -> str:
        angle = ("the tilt moves the crop by a pixel or more" if self.min_angle is None
                 else f"the tilt is >= {self.min_angle:g} deg")
        if self.min_confidence <= 0.0:
            return f"acts on every estimate where {angle}"
        return f"rotates when confidence >= {self.min_confidence:g} and {angle}"

    def decide(self, angle: float, confidence: float, size: tuple[int, int],
               crop: str = "max_area") -> Decision:
        """The action for a photo of ``size`` (width, height) whose estimate is ``angle`` (signed degrees)
        at ``confidence``."""
        if not confidence >= self.min_confidence:  # NaN confidence: kept
            return Decision(KEPT, f"{UNSURE} {_below(confidence, self.min_confidence)}")
        if self.min_angle is None:
            limit = one_pixel_angle(size[0], size[1], crop)
            if abs(angle) < limit:
                return Decision(KEPT, f"kept: tilt {abs(angle):.3f} deg changes the {size[0]}x{size[1]} "
                                      f"photo by under one pixel (< {limit:.3f} deg)")
        elif abs(angle) < self.min_angle:
            return Decision(KEPT, f"kept: tilt {abs(angle):.2f} deg < min angle {self.min_angle:g}")
        if self.min_confidence <= 0.0:
            return Decision(ROTATED, f"rotated: acting on every estimate (confidence {confidence:.2f})")
        return Decision(ROTATED, f"rotated: confidence {confidence:.2f} >= {self.min_confidence:g}")


def _below(value: float, limit: float) -> str:
    """'0.62 < 0.85', with as many decimals as it takes for the two numbers to read as different."""
    digits = 2
    while digits < 6 and round(value, digits) >= round(limit, digits):
        digits += 1
    return f"{value:.{digits}f} < {limit:g}"


def summary(actions: list[str]) -> str:
    """'3 rotated, 2 kept, 1 unreadable' from the actions of a run ('error' counts as unreadable)."""
    n_rot, n_kept = actions.count(ROTATED), actions.count(KEPT)
    return f"{n_rot} rotated, {n_kept} kept, {len(actions) - n_rot - n_kept} unreadable"


def rule_outcome(rule: DecisionRule, upright: Sequence[tuple[float, float, tuple[int, int]]],
                 tilted: Sequence[tuple[float, float, tuple[int, int], float]],
                 crop: str = "max_area") -> dict[str, float]:
    """What ``rule`` does to a set of photos, from their estimates.

    ``upright``: (estimated tilt, confidence, size) of photos that were straight; ``tilted``: (estimated
    tilt, confidence, size, true tilt) of tilted ones (signed degrees). Percentages: ``upright_turned``
    (rotated by more than 1 degree), ``tilted_worse`` (rotated and left further from straight than they
    were), ``tilted_rotated``, ``tilted_fixed2`` (within 2 degrees after the decision: a kept photo keeps
    its tilt); ``mae_after`` and ``mae_before`` in degrees."""
    if not upright or not tilted:
        raise ValueError("need at least one upright and one tilted photo to measure a rule")
    up_rot = np.array([rule.decide(a, c, s, crop).action == ROTATED for a, c, s in upright])
    up_angle = np.array([a for a, _, _ in upright], dtype=np.float64)
    ti_rot = np.array([rule.decide(a, c, s, crop).action == ROTATED for a, c, s, _ in tilted])
    est = np.array([a for a, _, _, _ in tilted], dtype=np.float64)
    true = np.array([t for _, _, _, t in tilted], dtype=np.float64)
    err = np.abs(circular_error(est, true))  # what a rotated photo is left with
    after = np.where(ti_rot, err, np.abs(true))
    return {"min_confidence": rule.min_confidence,
            "upright_turned": 100.0 * float((up_rot & (np.abs(up_angle) > 1.0)).mean()),
            "upright_rotated": 100.0 * float(up_rot.mean()),
            "tilted_worse": 100.0 * float((ti_rot & (err > np.abs(true))).mean()),
            "tilted_rotated": 100.0 * float(ti_rot.mean()),
            "tilted_fixed2": 100.0 * float((after <= 2.0).mean()),
            "mae_after": float(after.mean()), "mae_before": float(np.abs(true).mean())}


def choose_min_confidence(upright: Sequence[tuple[float, float, tuple[int, int]]],
                          tilted: Sequence[tuple[float, float, tuple[int, int], float]],
                          max_rate: float = 5.0, crop: str = "max_area") -> tuple[float, list[dict]]:
    """The smallest threshold (0, or a confidence seen) at which at most ``max_rate`` percent of the
    upright photos are turned and at most ``max_rate`` percent of the tilted ones made worse (use
    validation photos, never test photos); 1.0 when none qualifies. Returns it and the outcomes tried."""
    confs = sorted({0.0, *(c for _, c, _ in upright), *(c for _, c, _, _ in tilted)})
    tried = []
    for c in confs:
        if not 0.0 <= c <= 1.0:
            continue
        r = rule_outcome(DecisionRule(float(c)), upright, tilted, crop)
        tried.append(r)
        if r["upright_turned"] <= max_rate and r["tilted_worse"] <= max_rate:
            return float(c), tried
    return 1.0, tried
