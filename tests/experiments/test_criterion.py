"""The defaults criterion's logic: spike detection, the error ratio, the per-run verdict."""

from __future__ import annotations

import math

import pytest

from gaussnewton_experiments.criterion import error_ratio, judge_run, markdown_table, spike_ratio


def test_spike_ratio_against_the_running_median():
    flat = [1.0] * 60
    assert spike_ratio(flat) == (1.0, 10)  # no spike: ratio 1 from the first judged step
    losses = [1.0] * 30 + [30.0] + [1.0] * 29
    assert spike_ratio(losses) == (30.0, 30)
    # the median ignores a single earlier outlier: the second spike is judged against 1, not 30
    losses = [1.0] * 30 + [30.0] + [1.0] * 10 + [12.0] + [1.0] * 5
    assert spike_ratio(losses) == (30.0, 30)
    assert spike_ratio(losses[:30] + [1.0] * 11 + [12.0]) == (12.0, 41)


def test_spike_ratio_window_and_history():
    # a loss that fell 100x stays judged against the window, not against the start
    losses = [100.0] * 20 + [1.0] * 60 + [5.0]
    r, t = spike_ratio(losses, window=50)
    assert (r, t) == (5.0, 80)
    # a window of 70 holds 10 losses of 100 and 60 of 1: the median is still 1
    assert spike_ratio(losses, window=70) == (5.0, 80)
    # a spike before min_history is not judged
    assert spike_ratio([1.0, 50.0] + [1.0] * 20) == (1.0, 10)
    assert math.isnan(spike_ratio([1.0] * 10)[0])
    with pytest.raises(ValueError, match="window"):
        spike_ratio([1.0] * 20, window=0)


def test_span_median_ignores_one_batch_and_sees_a_rise():
    one = [1.0] * 20 + [30.0] + [1.0] * 10
    assert spike_ratio(one, span=5) == (1.0, 14)
    rise = [1.0] * 20 + [30.0, 1.0, 20.0, 25.0, 1.0]  # 3 of the last 5 high: median 20
    assert spike_ratio(rise, span=5) == (20.0, 23)
    assert spike_ratio([1.0] * 20 + [math.nan] + [1.0] * 3, span=5)[0] == math.inf


def test_non_finite_loss_is_an_infinite_spike():
    assert spike_ratio([1.0] * 12 + [math.nan] + [1.0]) == (math.inf, 12)
    assert spike_ratio([1.0] * 12 + [math.inf]) == (math.inf, 12)


def test_error_ratio_rmse_and_accuracy():
    assert error_ratio(1.2, 0.6, higher_is_better=False) == pytest.approx(2.0)
    # accuracy: error = 1 - accuracy
    assert error_ratio(0.80, 0.90, higher_is_better=True) == pytest.approx(2.0)
    assert error_ratio(0.95, 0.90, higher_is_better=True) == pytest.approx(0.5)
    assert error_ratio(math.nan, 0.5, higher_is_better=False) == math.inf
    assert error_ratio(1.0, 1.0, higher_is_better=True) == 1.0  # both perfect


def _rows(metrics, vals, losses_per_eval):
    rows = [{"step": 0, "metric": metrics[0], "val_metric": vals[0]}]
    for i, (m, v) in enumerate(zip(metrics[1:], vals[1:], strict=True)):
        rows.append(
            {
                "step": 10 * (i + 1),
                "metric": m,
                "val_metric": v,
                "trace": {"loss": losses_per_eval[i], "damping": [1e-3] * 10},
                "trace_stride": 1,
                "rejected": 0,
                "train_time": 0.1 * (i + 1),
            }
        )
    return rows


def test_judge_run_pass_and_fail():
    flat = [[1.0] * 10] * 3
    # regression: best validation at the 2nd evaluation (test 0.5), final test 0.9 -> 1.8: pass
    res = judge_run(_rows([2.0, 0.5, 0.7, 0.9], [2.0, 0.4, 0.6, 0.8], flat), False)
    assert res["at_best_val"] == 0.5 and res["final"] == 0.9
    assert res["error_ratio"] == pytest.approx(1.8) and res["pass"]
    # the selection is by VALIDATION, not by test: test 0.3 at an evaluation with a worse val
    res = judge_run(_rows([2.0, 0.3, 0.5, 1.1], [2.0, 0.6, 0.4, 0.8], flat), False)
    assert res["at_best_val"] == 0.5 and res["error_ratio"] == pytest.approx(2.2)
    assert not res["pass"]
    # one outlying batch is reported (spike_1) but is not a rise of the training loss ...
    one = [[1.0] * 10, [1.0] * 5 + [11.0] + [1.0] * 4, [1.0] * 10]
    res = judge_run(_rows([2.0, 0.5, 0.5, 0.5], [2.0, 0.5, 0.5, 0.5], one), False)
    assert res["spike_1"] == 11.0 and res["spike"] == 1.0 and res["pass"]
    assert res["spikes_over_3"] == res["spikes_over_limit"] == 1
    # ... a rise that lasts 3 of 5 steps fails a run whose test error is fine
    rise = [[1.0] * 10, [1.0] * 5 + [11.0, 12.0, 1.0, 13.0] + [1.0], [1.0] * 10]
    res = judge_run(_rows([2.0, 0.5, 0.5, 0.5], [2.0, 0.5, 0.5, 0.5], rise), False)
    assert res["spike"] == 11.0 and res["spike_step"] == 19 and not res["pass"]
    # classification: accuracy 0.9 at best validation, final 0.85 -> error ratio 1.5
    res = judge_run(_rows([0.5, 0.9, 0.88, 0.85], [0.5, 0.9, 0.89, 0.86], flat), True)
    assert res["error_ratio"] == pytest.approx(1.5) and res["pass"]
    assert "PASS" in markdown_table([{**res, "experiment": "x", "optimizer": "o", "seed": 0,
                                      "batch_size": 8}])  # fmt: skip


def test_judge_run_refuses_thinned_traces():
    rows = _rows([1.0, 1.0], [1.0, 1.0], [[1.0] * 10])
    rows[1]["trace_stride"] = 4
    with pytest.raises(ValueError, match="eval_every <= 50"):
        judge_run(rows, False)
