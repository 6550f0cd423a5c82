"""Circular error and the rotation metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from effvit.rotation.metrics import METRIC_KEYS, circular_error, format_metrics, rotation_metrics


def test_circular_error_wraps_including_negative_angles():
    pred = [10, 350, -10, -170, 180, 0, 359.5, -5, 725]
    true = [350, 10, 10, 170, 0, 180, 0.5, 355, 0]
    assert circular_error(pred, true).tolist() == pytest.approx([20, -20, -20, 20, -180, -180, -1, 0, 5])
    # the reference code's min(|d|, 360 - |d|) goes negative for negative labels; ours never exceeds 180
    assert np.abs(circular_error(np.array([-350.0]), np.array([5.0]))).item() == pytest.approx(5.0)
    t = circular_error(torch.tensor([1.0, 359.0]), torch.tensor([359.0, 1.0]))
    assert isinstance(t, torch.Tensor) and t.tolist() == pytest.approx([2.0, -2.0])


def test_metrics_hand_computed():
    # |errors| 1, 3, 6, 12, 179 given as signed / unwrapped differences
    m = rotation_metrics([361.0, -3.0, 6.0, -12.0, -181.0])
    assert m["mae"] == pytest.approx((1 + 3 + 6 + 12 + 179) / 5)
    assert m["median"] == pytest.approx(6.0)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 9 + 36 + 144 + 179 ** 2) / 5))
    assert m["p90"] == pytest.approx(12 + 0.6 * 167)  # linear interpolation between the 4th and 5th
    assert m["p95"] == pytest.approx(12 + 0.8 * 167)
    assert (m["acc@2"], m["acc@5"], m["acc@10"]) == pytest.approx((20.0, 40.0, 60.0))
    assert m["auc@2"] == pytest.approx((1 - 1 / 2) / 5)
    assert m["auc@5"] == pytest.approx(((1 - 1 / 5) + (1 - 3 / 5)) / 5)
    assert m["auc@10"] == pytest.approx((0.9 + 0.7 + 0.4) / 5)
    assert m["n"] == 5
    assert set(METRIC_KEYS) <= set(m)


def test_auc_is_the_area_under_the_cumulative_error_curve():
    e = np.random.default_rng(0).exponential(4.0, 500)
    t = np.linspace(0, 5, 20001)
    cdf = (e[None, :] <= t[:, None]).mean(axis=1)
    assert rotation_metrics(e)["auc@5"] == pytest.approx(np.trapezoid(cdf, t) / 5, abs=1e-3)


def test_perfect_and_chance_levels():
    assert rotation_metrics(np.zeros(10))["mae"] == 0.0
    assert rotation_metrics(np.zeros(10))["auc@2"] == 1.0
    # uniform random guesses on the full circle: MAE 90 degrees
    e = np.random.default_rng(1).uniform(-180, 180, 200000)
    assert rotation_metrics(e)["mae"] == pytest.approx(90.0, abs=0.5)


def test_metrics_bad_input_and_format():
    with pytest.raises(ValueError, match="at least one"):
        rotation_metrics([])
    with pytest.raises(ValueError, match="NaN"):
        rotation_metrics([1.0, float("nan")])
    line = format_metrics(rotation_metrics(torch.tensor([1.0, 2.0])))
    assert line.startswith("MAE 1.50  median 1.50") and "acc@2 100.0%" in line and "AUC@10" in line
