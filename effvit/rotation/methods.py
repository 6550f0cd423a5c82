"""The five circular-aware output heads: target encoding, loss, decoder and confidence per method.

Angles are in degrees. theta is the counter-clockwise rotation applied to an upright image, in
[0, 360); a network output decodes to an estimate of theta, also in [0, 360).

| name | outputs | target | loss | decode |
|------|---------|--------|------|--------|
| da   | 1 (radians, see below) | theta | wrapped L1 in degrees | p mod 360 |
| cls  | 360 logits, bin k = [k, k+1) | floor(theta) | cross-entropy | argmax -> k + 0.5 |
| uv   | 2 | (cos, sin) | L1 + 0.01 (|v| - 1)^2 | atan2 |
| psc  | 3 | cos(theta + 2 pi n / 3) | L1 | phase of the 3-phase signal |
| cgd  | 360 logits, bin k centred on k | wrapped Gaussian, sigma 6 | KL(target || softmax) | argmax -> k |

Beyond the paper:
- ``decode(out, subdegree=True)`` for the binned heads takes the circular mean of the softmax mass within
  +-15 bins of the peak (each bin at its own centre, k + 0.5 for cls, k for cgd), which removes the
  1-degree quantisation floor;
- ``decode(out, window=(lo, hi))`` restricts the answer to a window of angles (signed degrees, e.g.
  (-45, 45)): binned heads mask the bins outside it, the continuous heads move an answer outside the
  window to the nearest end (the best in-window angle for a vector head, whose score cos(a - estimate)
  falls with the distance);
- ``confidence(out)`` in [0, 1] for every head, see each class; 0 means no better than chance. DA has
  no uncertainty in its single output and returns 1; ``RotationModel.predict`` replaces that by a
  flip-consistency check.

DA's head emits radians and the loss/decoder convert to degrees: a regression head starts with outputs
of order 1, and asking it to span 0..360 in degrees would need a learning rate hundreds of times higher
for that one layer. The loss is still the paper's wrapped L1 in degrees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_BINS = 360
LOCAL_BINS = 15  # half-width (in bins) of the sub-degree circular mean and of the binned confidence


def wrap360(a: torch.Tensor) -> torch.Tensor:
    """Angles (degrees) into [0, 360)."""
    a = torch.remainder(a, 360.0)
    return torch.where(a >= 360.0, a - 360.0, a)  # remainder can round up to exactly 360 in float32


def wrap180(a: torch.Tensor) -> torch.Tensor:
    """Angles (degrees) into [-180, 180)."""
    return wrap360(a + 180.0) - 180.0


def _as_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"angle window must be (lo, hi) with lo < hi in degrees, got {window}")
    if hi - lo >= 360.0:
        return None  # the full circle: no restriction
    return lo, hi


def in_window(angle: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """True where ``angle`` (any degrees) lies in the circular window [lo, hi]."""
    lo, hi = window
    return wrap360(angle - lo) <= (hi - lo) + 1e-6


def clamp_to_window(angle: torch.Tensor, window: tuple[float, float] | None) -> torch.Tensor:
    """Angles outside the window moved to the circularly nearest end; result in [0, 360)."""
    window = _as_window(window)
    angle = wrap360(angle)
    if window is None:
        return angle
    lo, hi = window
    d_lo = wrap180(angle - lo).abs()
    d_hi = wrap180(angle - hi).abs()
    end = torch.where(d_lo <= d_hi, torch.full_like(angle, lo), torch.full_like(angle, hi))
    return torch.where(in_window(angle, window), angle, wrap360(end))


def _unit(angle_deg: torch.Tensor) -> torch.Tensor:
    r = torch.deg2rad(angle_deg)
    return torch.stack([torch.cos(r), torch.sin(r)], dim=-1)


class RotationMethod:
    """One output head: how many outputs, the target encoding, the loss, the decoder, the confidence."""

    name: str = ""
    num_outputs: int = 0
    mlp_head: bool = False  # UV and PSC use LayerNorm -> MLP on pooled features (as the reference does)

    def encode(self, theta: torch.Tensor) -> torch.Tensor:
        """Training target for angles ``theta`` (degrees, shape (B,))."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``output`` (B, num_outputs) against ``encode(theta)``."""
        raise NotImplementedError

    def criterion(self, output: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Loss straight from angles: what a training loop calls."""
        return self.loss(output, self.encode(theta.to(output.device, torch.float32)))

    def decode(self, output: torch.Tensor, window: tuple[float, float] | None = None,
               subdegree: bool = False) -> torch.Tensor:
        """Estimated angles in [0, 360), shape (B,)."""
        raise NotImplementedError

    def confidence(self, output: torch.Tensor, window: tuple[float, float] | None = None) -> torch.Tensor:
        """How much to trust the decoded angle, in [0, 1], shape (B,)."""
        raise NotImplementedError

    def perfect_output(self, theta: torch.Tensor) -> torch.Tensor:
        """The output a perfect network would give for ``theta``: its loss is (near) zero."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DirectAngle(RotationMethod):
    """DA: one value. The wrapped L1 makes 359 and 1 close, but the output itself still jumps at 0/360."""

    name = "da"
    num_outputs = 1

    @staticmethod
    def degrees(output: torch.Tensor) -> torch.Tensor:
        return torch.rad2deg(output.float()[:, 0])

    def encode(self, theta: torch.Tensor) -> torch.Tensor:
        return wrap360(theta.float())

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = (wrap360(self.degrees(output)) - target).abs()
        return torch.minimum(d, 360.0 - d).mean()

    def decode(self, output, window=None, subdegree=False):
        return clamp_to_window(self.degrees(output), window)

    def confidence(self, output, window=None):
        # A single number says nothing about its own reliability: 1 means "no information".
        return torch.ones(output.shape[0], device=output.device)

    def perfect_output(self, theta):
        return torch.deg2rad(wrap360(theta.float()))[:, None]


class _Binned(RotationMethod):
    """Shared decoding for the 360-bin heads; ``offset`` is the bin centre within its degree."""

    num_outputs = NUM_BINS
    offset = 0.0

    def centres(self, device=None) -> torch.Tensor:
        return torch.arange(NUM_BINS, device=device, dtype=torch.float32) + self.offset

    def _log_probs(self, output: torch.Tensor, window) -> torch.Tensor:
        logits = output.float()
        window = _as_window(window)
        if window is not None:
            keep = in_window(self.centres(output.device), window)
            if not keep.any():  # a window narrower than a bin: keep the bin holding its middle
                keep = torch.zeros_like(keep)
                keep[int(math.floor((sum(window) / 2) % 360.0))] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.log_softmax(dim=-1)

    def _local(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Peak bin, the +-LOCAL_BINS neighbour indices (B, 2k+1) and their probabilities."""
        peak = probs.argmax(dim=-1)
        steps = torch.arange(-LOCAL_BINS, LOCAL_BINS + 1, device=probs.device)
        idx = torch.remainder(peak[:, None] + steps, NUM_BINS)
        return peak, idx, probs.gather(1, idx)

    def decode(self, output, window=None, subdegree=False):
        probs = self._log_probs(output, window).exp()
        peak, idx, w = self._local(probs)
        if not subdegree:
            return wrap360(peak.float() + self.offset)
        vec = (w[..., None] * _unit(idx.float() + self.offset)).sum(dim=1)
        # a bin centre can sit just outside the window (its bin straddles the end): clamp
        return clamp_to_window(torch.rad2deg(torch.atan2(vec[:, 1], vec[:, 0])), window)

    def confidence(self, output, window=None):
        # Probability mass within +-k bins of the peak (k = 15, fewer in a narrow window), corrected for
        # chance: 0 for a flat output, 1 when all mass is near the peak. A 90 or 180 degree ambiguity
        # splits the mass and shows up here.
        probs = self._log_probs(output, window).exp()
        n = int(torch.isfinite(self._log_probs(output[:1], window)).sum())  # bins inside the window
        k = max(0, min(LOCAL_BINS, (n - 1) // 6))
        peak = probs.argmax(dim=-1)
        steps = torch.arange(-k, k + 1, device=probs.device)
        mass = probs.gather(1, torch.remainder(peak[:, None] + steps, NUM_BINS)).sum(dim=1)
        chance = (2 * k + 1) / n
        if chance >= 1.0:
            return torch.ones_like(mass)  # a one-bin window leaves nothing to doubt
        return ((mass - chance) / (1.0 - chance)).clamp(0.0, 1.0)


class Classification(_Binned):
    """CLS: 360 one-degree bins, bin k holds [k, k+1) and decodes to its centre k + 0.5."""

    name = "cls"
    offset = 0.5

    def encode(self, theta):
        return torch.floor(wrap360(theta.float())).long().clamp_(0, NUM_BINS - 1)

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target)

    def perfect_output(self, theta):
        onehot = F.one_hot(self.encode(theta), NUM_BINS).float()
        return torch.log(onehot.clamp_min(1e-12))


class CircularGaussian(_Binned):
    """CGD: 360 bins centred on whole degrees; the target is a wrapped Gaussian (sigma 6) around theta."""

    name = "cgd"
    offset = 0.0

    def __init__(self, sigma: float = 6.0):
        if sigma <= 0:
            raise ValueError(f"CGD sigma must be > 0 degrees, got {sigma}")
        self.sigma = float(sigma)

    def encode(self, theta):
        d = wrap180(self.centres(theta.device)[None, :] - wrap360(theta.float())[:, None])
        p = torch.exp(-0.5 * (d / self.sigma) ** 2)
        return p / p.sum(dim=1, keepdim=True)

    def loss(self, output, target):
        return F.kl_div(output.float().log_softmax(dim=-1), target, reduction="batchmean")

    def perfect_output(self, theta):
        return torch.log(self.encode(theta).clamp_min(1e-30))

    def __repr__(self) -> str:
        return f"CircularGaussian(sigma={self.sigma})"


class _Vector(RotationMethod):
    """Shared window handling and confidence for heads whose output decodes to a 2-D vector."""

    mlp_head = True

    def vector(self, output: torch.Tensor) -> torch.Tensor:
        """(B, 2) vector whose direction is the angle and whose length is 1 for a perfect output."""
        raise NotImplementedError

    def decode(self, output, window=None, subdegree=False):
        v = self.vector(output)
        return clamp_to_window(torch.rad2deg(torch.atan2(v[:, 1], v[:, 0])), window)

    def confidence(self, output, window=None):
        # Length of the predicted vector along the answer: a net that hesitates between two angles
        # regresses towards their mean, which is shorter; an answer pushed to a window's end counts
        # only the part of the vector that points there.
        v = self.vector(output)
        along = (v * _unit(self.decode(output, window))).sum(dim=1)
        return along.clamp(0.0, 1.0)


class UnitVector(_Vector):
    """UV: (cos theta, sin theta); the norm penalty keeps the output on the circle."""

    name = "uv"
    num_outputs = 2

    def __init__(self, norm_weight: float = 0.01):
        self.norm_weight = float(norm_weight)

    def encode(self, theta):
        return _unit(theta.float())

    def loss(self, output, target):
        output = output.float()
        norm = output.norm(dim=1)
        return F.l1_loss(output, target) + self.norm_weight * ((norm - 1.0) ** 2).mean()

    def vector(self, output):
        return output.float()

    def perfect_output(self, theta):
        return self.encode(theta)


_PSC_PHASES = 2.0 * math.pi * torch.arange(3, dtype=torch.float32) / 3.0


class PhaseShiftingCoder(_Vector):
    """PSC: three cosines 120 degrees apart; the phase of that 3-phase signal is the angle."""

    name = "psc"
    num_outputs = 3

    def encode(self, theta):
        r = torch.deg2rad(theta.float())[:, None]
        return torch.cos(r + _PSC_PHASES.to(r.device))

    def loss(self, output, target):
        return F.l1_loss(output.float(), target)

    def vector(self, output):
        # m_n = cos(t + p_n): sum m_n cos p_n = 1.5 cos t, sum m_n sin p_n = -1.5 sin t
        m = output.float()
        ph = _PSC_PHASES.to(m.device)
        c = (m * torch.cos(ph)).sum(dim=1)
        s = -(m * torch.sin(ph)).sum(dim=1)
        return torch.stack([c, s], dim=1) / 1.5

    def perfect_output(self, theta):
        return self.encode(theta)


METHODS: dict[str, type[RotationMethod]] = {
    "da": DirectAngle, "cls": Classification, "uv": UnitVector, "psc": PhaseShiftingCoder,
    "cgd": CircularGaussian,
}


def get_method(name: str | RotationMethod) -> RotationMethod:
    """'da' | 'cls' | 'uv' | 'psc' | 'cgd' (case-insensitive) -> a method instance."""
    if isinstance(name, RotationMethod):
        return name
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown rotation method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]()


def mlp_head(in_features: int, num_outputs: int) -> nn.Sequential:
    """The reference's head for UV and PSC: LayerNorm, then C/2, C/4, C/8 with ReLU and dropout."""
    dims = [in_features, max(in_features // 2, 1), max(in_features // 4, 1), max(in_features // 8, 1)]
    layers: list[nn.Module] = [nn.LayerNorm(in_features)]
    for cin, cout, p in zip(dims[:-1], dims[1:], (0.2, 0.1, 0.05), strict=True):
        layers += [nn.Linear(cin, cout), nn.ReLU(inplace=True), nn.Dropout(p)]
    layers.append(nn.Linear(dims[-1], num_outputs))
    return nn.Sequential(*layers)
