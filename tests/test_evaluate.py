"""score_ray.evaluate: the paper's five self-correction metrics and their table."""

import pytest

from score_ray.evaluate import format_table, self_correction_metrics


def test_five_metrics_by_hand():
    # 5 problems: (t1, t2) = (1,1) (0,1) (0,1) (1,0) (0,0)
    metrics = self_correction_metrics([1, 0, 0, 1, 0], [1, 1, 1, 0, 0])
    assert metrics["acc_t1"] == pytest.approx(0.4)
    assert metrics["acc_t2"] == pytest.approx(0.6)
    assert metrics["delta"] == pytest.approx(0.2)
    assert metrics["delta_i2c"] == pytest.approx(0.4)
    assert metrics["delta_c2i"] == pytest.approx(0.2)
    assert metrics["delta"] == pytest.approx(metrics["delta_i2c"] - metrics["delta_c2i"])
    # SE of acc_t1: sample sd of (1,0,0,1,0) = sqrt(0.3); / sqrt(5)
    assert metrics["acc_t1_se"] == pytest.approx((0.3 / 5) ** 0.5)
    table = format_table({"base": metrics})
    assert "Acc@t1" in table and "Delta_c->i" in table and "40.0" in table and "of 5 held-out" in table
