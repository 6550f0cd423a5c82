"""The five rotation heads: encode/decode round trips across 0/360, losses, windows, confidences."""

import math

import pytest
import torch

from effvit.rotation.methods import (
    METHODS,
    CircularGaussian,
    Classification,
    DirectAngle,
    UnitVector,
    clamp_to_window,
    get_method,
    mlp_head,
    wrap180,
    wrap360,
)
from effvit.rotation.metrics import circular_error

# angles right at and around the wrap, negative and beyond one turn, plus random ones
WRAP_ANGLES = [0.0, 1e-4, 0.3, 0.5, 0.99, 1.0, 179.5, 180.0, 359.0, 359.5, 359.7, 359.9999, -0.3, -1.0,
               -90.25, 360.0, 361.2, 719.9]
# worst-case decode error from quantisation: CLS decodes bin centres k + 0.5, CGD argmax whole degrees
TOLERANCE = {"da": 1e-3, "uv": 1e-3, "psc": 1e-3, "cls": 0.5 + 1e-4, "cgd": 0.5 + 1e-4}


def angles():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor(WRAP_ANGLES), torch.rand(200, generator=g) * 720 - 360])


@pytest.mark.parametrize("name", list(METHODS))
def test_encode_decode_round_trip_across_wrap(name):
    m = get_method(name)
    theta = angles()
    out = m.perfect_output(theta)
    assert out.shape == (len(theta), m.num_outputs)
    pred = m.decode(out)
    assert pred.min() >= 0 and pred.max() < 360
    err = circular_error(pred, theta).abs().max().item()
    assert err <= TOLERANCE[name], f"{name}: worst round-trip error {err} deg"


@pytest.mark.parametrize("name", ["cls", "cgd"])
def test_subdegree_decoder_removes_quantisation(name):
    m = get_method(name)
    theta = torch.tensor([0.0, 0.3, 0.77, 123.45, 359.6, -0.2, 271.01])
    if name == "cgd":
        out = m.perfect_output(theta)  # a Gaussian around the exact angle
    else:  # a CLS net that spreads its belief smoothly around the angle (each bin at its centre k + 0.5)
        d = wrap180(torch.arange(360.0)[None] + 0.5 - theta[:, None])
        out = -0.5 * (d / 3.0) ** 2
    coarse = circular_error(m.decode(out), theta).abs().max()
    fine = circular_error(m.decode(out, subdegree=True), theta).abs().max()
    assert fine < 0.05, fine
    assert fine < coarse


def test_binned_targets_and_bin_conventions():
    cls = Classification()
    assert cls.encode(torch.tensor([0.0, 0.99, 1.0, 359.7, -0.3, 360.0])).tolist() == [0, 0, 1, 359, 359, 0]
    # bin k decodes to k + 0.5 for CLS, to k for CGD: mixing them would bias every answer by 0.5 degree
    onehot = torch.full((1, 360), -30.0)
    onehot[0, 10] = 0.0
    assert cls.decode(onehot).item() == pytest.approx(10.5)
    assert CircularGaussian().decode(onehot).item() == pytest.approx(10.0)
    target = CircularGaussian().encode(torch.tensor([359.5]))
    assert target.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert target[0, 359] == pytest.approx(target[0, 0].item(), rel=1e-5)  # symmetric around the wrap
    assert target[0, 353] == pytest.approx(target[0, 6].item(), rel=1e-5)
    # sigma 6 degrees: neighbours one sigma away weigh exp(-1/2) of the peak
    t0 = CircularGaussian().encode(torch.tensor([90.0]))[0]
    assert (t0[96] / t0[90]).item() == pytest.approx(math.exp(-0.5), rel=1e-4)


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_zero_at_target_positive_elsewhere_with_gradients(name):
    m = get_method(name)
    theta = angles()[:32]
    perfect = m.perfect_output(theta)
    assert m.criterion(perfect, theta).item() == pytest.approx(0.0, abs=1e-5)
    # elsewhere: the perfect output for other angles, softened so every output gets a gradient
    out = m.perfect_output(theta + 37.0)
    out = out.clamp_min(-5.0) if name in ("cls", "cgd") else out
    out.requires_grad_(True)
    loss = m.criterion(out, theta)
    assert loss.item() > 1e-3
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


def test_direct_angle_loss_is_wrapped():
    da = DirectAngle()
    out = da.perfect_output(torch.tensor([359.0]))
    assert da.criterion(out, torch.tensor([1.0])).item() == pytest.approx(2.0, abs=1e-3)
    # the raw output may leave [0, 360): 721 degrees is 1 degree
    out = torch.tensor([[math.radians(721.0)]])
    assert da.criterion(out, torch.tensor([359.0])).item() == pytest.approx(2.0, abs=1e-3)
    assert da.decode(out).item() == pytest.approx(1.0, abs=1e-3)


def test_unit_vector_norm_penalty():
    uv = UnitVector()
    theta = torch.tensor([30.0])
    doubled = 2 * uv.perfect_output(theta)
    l1 = (doubled - uv.encode(theta)).abs().mean()
    assert uv.criterion(doubled, theta).item() == pytest.approx(l1.item() + 0.01 * 1.0, abs=1e-6)


def test_window_restricts_binned_heads():
    for m in (Classification(), CircularGaussian()):
        out = torch.full((1, 360), -20.0)
        out[0, 180] = 5.0  # the global peak, outside the window
        out[0, 350] = 2.0  # the best answer inside (-45, 45)
        assert m.decode(out).item() == pytest.approx(180 + m.offset)
        assert m.decode(out, window=(-45, 45)).item() == pytest.approx(350 + m.offset)
        sub = m.decode(out, window=(-45, 45), subdegree=True).item()
        assert abs(circular_error(sub, 350 + m.offset)) < 0.5
        # confidence is renormalised inside the window
        assert m.confidence(out, window=(-45, 45)).item() > m.confidence(out).item()


@pytest.mark.parametrize("name", ["da", "uv", "psc"])
def test_window_clamps_continuous_heads_to_nearest_end(name):
    m = get_method(name)
    out = m.perfect_output(torch.tensor([90.0, 300.0, 10.0, 200.0]))
    got = m.decode(out, window=(-45, 45))
    assert got.tolist() == pytest.approx([45.0, 315.0, 10.0, 315.0], abs=1e-3)


def test_clamp_to_window_full_circle_and_errors():
    a = torch.tensor([-10.0, 400.0])
    assert clamp_to_window(a, None).tolist() == pytest.approx([350.0, 40.0])
    assert clamp_to_window(a, (0, 360)).tolist() == pytest.approx([350.0, 40.0])
    with pytest.raises(ValueError, match="lo < hi"):
        clamp_to_window(a, (10, -10))


def test_confidences():
    theta = torch.tensor([12.0, 250.0])
    for name in METHODS:
        m = get_method(name)
        c = m.confidence(m.perfect_output(theta))
        assert c.shape == (2,) and (c > 0.98).all(), (name, c)
    # binned: mass within +-15 bins of the peak, chance-corrected: a flat output (31/360 there) is 0,
    # a 0/180 ambiguity halves the mass; narrow windows shrink the neighbourhood so flat stays 0
    flat = torch.zeros(1, 360)
    chance = 31 / 360
    assert Classification().confidence(flat).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.full((1, 360), -30.0)
    two[0, [0, 180]] = 0.0
    assert Classification().confidence(two).item() == pytest.approx((0.5 - chance) / (1 - chance), abs=1e-3)
    for window in ((-45, 45), (-10, 10), (-2, 2)):
        assert CircularGaussian().confidence(flat, window).item() == pytest.approx(0.0, abs=1e-6)
    peaked = Classification().perfect_output(torch.tensor([3.0]))
    assert Classification().confidence(peaked, (-10, 10)).item() > 0.99
    # vectors: an output hesitating between opposite angles is short, so low confidence
    uv, psc = get_method("uv"), get_method("psc")
    assert uv.confidence(0.3 * uv.perfect_output(theta)).tolist() == pytest.approx([0.3, 0.3], abs=1e-5)
    assert psc.confidence(0.5 * psc.perfect_output(theta)).tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    # clamped to a window end, only the part of the vector pointing there counts: cos(45) here
    assert uv.confidence(uv.perfect_output(torch.tensor([90.0])), window=(-45, 45)).item() == pytest.approx(
        math.cos(math.radians(45)), abs=1e-5)


def test_get_method_and_heads():
    assert isinstance(get_method("CGD"), CircularGaussian)
    assert get_method(get_method("uv")).name == "uv"
    with pytest.raises(ValueError, match="choose from da, cls, uv, psc, cgd"):
        get_method("angle")
    with pytest.raises(ValueError, match="sigma"):
        CircularGaussian(sigma=0)
    head = mlp_head(192, 3)
    assert head(torch.randn(4, 192)).shape == (4, 3)
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [96, 48, 24, 3]


def test_wrap_helpers():
    a = torch.tensor([-360.0, -180.0, -0.0, 179.999, 180.0, 540.0, -1e-9])
    assert wrap360(a).min() >= 0 and wrap360(a).max() < 360
    assert wrap180(a).tolist() == pytest.approx([0.0, -180.0, 0.0, 179.999, -180.0, -180.0, 0.0], abs=1e-4)
