"""tasks/metrics.py against small cases computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from lifelong.tasks.metrics import (
    ContinualTrace,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_summary,
    matrix_summary,
    min_acc,
    wc_acc,
    windowed_forgetting,
    windowed_plasticity,
)

# R[k][i]: accuracy on experience i after training on experience k.
# R[1][0] > R[0][0] on purpose: forgetting takes the best accuracy *before the end*, not the
# diagonal, so forgetting and -BWT differ here.
R3 = np.array([
    [0.6, 0.1, 0.0],
    [0.9, 0.8, 0.2],
    [0.5, 0.7, 0.9],
])
# A joint learner: one row, all experiences at once.
JOINT = np.array([[0.8, 0.9, 0.7]])


# --------------------------------------------------------------------------- accuracy matrix


def test_average_accuracy_final_row():
    # (0.5 + 0.7 + 0.9) / 3 = 2.1 / 3 = 0.7
    assert average_accuracy(R3) == pytest.approx(0.7)


def test_average_accuracy_after_experience_k_ignores_unseen_experiences():
    # k=0: R[0][0] = 0.6  (R[0][1], R[0][2] are experiences not seen yet: left out)
    assert average_accuracy(R3, 0) == pytest.approx(0.6)
    # k=1: (R[1][0] + R[1][1]) / 2 = (0.9 + 0.8) / 2 = 0.85  (R[1][2] = 0.2 left out)
    assert average_accuracy(R3, 1) == pytest.approx(0.85)
    # k=2: the whole last row, 0.7
    assert average_accuracy(R3, 2) == pytest.approx(0.7)


def test_average_forgetting_uses_best_accuracy_before_the_end():
    # i=0: max(R[0][0], R[1][0]) - R[2][0] = max(0.6, 0.9) - 0.5 = 0.4
    # i=1: max(R[1][1])          - R[2][1] = 0.8 - 0.7          = 0.1
    # mean (0.4 + 0.1) / 2 = 0.25
    assert average_forgetting(R3) == pytest.approx(0.25)


def test_backward_transfer():
    # i=0: R[2][0] - R[0][0] = 0.5 - 0.6 = -0.1
    # i=1: R[2][1] - R[1][1] = 0.7 - 0.8 = -0.1
    # mean -0.1
    assert backward_transfer(R3) == pytest.approx(-0.1)


def test_positive_backward_transfer_and_zero_forgetting():
    # R = [[0.5, 0], [0.7, 0.9]]: experience 0 improves after experience 1.
    m = [[0.5, 0.0], [0.7, 0.9]]
    # forgetting: max(R[0][0]) - R[1][0] = 0.5 - 0.7 = -0.2 (a gain counts as negative forgetting)
    assert average_forgetting(m) == pytest.approx(-0.2)
    # BWT: R[1][0] - R[0][0] = 0.7 - 0.5 = 0.2
    assert backward_transfer(m) == pytest.approx(0.2)


def test_joint_one_row_matrix():
    # (0.8 + 0.9 + 0.7) / 3 = 2.4 / 3 = 0.8
    assert average_accuracy(JOINT) == pytest.approx(0.8)
    # fewer than two rows: nothing can be forgotten
    assert average_forgetting(JOINT) == 0.0
    assert backward_transfer(JOINT) == 0.0


def test_single_experience_square_matrix():
    assert average_accuracy([[0.75]]) == pytest.approx(0.75)
    assert average_forgetting([[0.75]]) == 0.0
    assert backward_transfer([[0.75]]) == 0.0


def test_matrix_summary_square():
    s = matrix_summary(R3)
    assert set(s) == {"avg_accuracy", "avg_forgetting", "bwt"}
    assert s["avg_accuracy"] == pytest.approx(0.7)    # see test_average_accuracy_final_row
    assert s["avg_forgetting"] == pytest.approx(0.25)  # see test_average_forgetting_...
    assert s["bwt"] == pytest.approx(-0.1)            # see test_backward_transfer
    assert all(isinstance(v, float) for v in s.values())


def test_matrix_summary_joint_has_accuracy_only():
    # 1×3 is not square: forgetting and BWT need one row per experience
    assert matrix_summary(JOINT) == {"avg_accuracy": pytest.approx(0.8)}


# --------------------------------------------------------------------------- continual evaluation


def make_trace() -> ContinualTrace:
    """Three experiences; a pre-update point opens experiences 1 and 2, at the iteration of the
    previous experience's last point (same model, same accuracies)."""
    t = ContinualTrace()
    # idx  it  exp  accuracies
    t.add(0, 0, {0: 0.2})                        # P1
    t.add(10, 0, {0: 0.6})                       # P2
    t.add(20, 0, {0: 0.9})                       # P3  end of experience 0: iteration 20
    t.add(20, 1, {0: 0.9, 1: 0.1})               # P4  pre-update of experience 1
    t.add(30, 1, {0: 0.6, 1: 0.5})               # P5
    t.add(40, 1, {0: 0.4, 1: 0.8})               # P6  end of experience 1: iteration 40
    t.add(40, 2, {0: 0.4, 1: 0.8, 2: 0.0})       # P7  pre-update of experience 2
    t.add(50, 2, {0: 0.3, 1: 0.2, 2: 0.6})       # P8
    t.add(60, 2, {0: 0.8, 1: 0.7, 2: 0.9})       # P9
    return t
# Series per experience (every point that has it):
#   exp 0: [0.2, 0.6, 0.9, 0.9, 0.6, 0.4, 0.4, 0.3, 0.8]   (P1..P9)
#   exp 1: [0.1, 0.5, 0.8, 0.8, 0.2, 0.7]                  (P4..P9)
#   exp 2: [0.0, 0.6, 0.9]                                 (P7..P9)


def test_series():
    t = make_trace()
    assert t.series(1) == [0.1, 0.5, 0.8, 0.8, 0.2, 0.7]
    # after_task=1: only points recorded while learning experience 2 (P7..P9)
    assert t.series(0, after_task=1) == [0.4, 0.3, 0.8]


def test_min_acc_first_experience_is_none():
    assert min_acc(make_trace(), 0) is None


def test_min_acc_while_learning_experience_1():
    # exp 0 ended at iteration 20; evaluations with iteration > 20 and experience <= 1: P5 (0.6), P6 (0.4)
    # (P4 at iteration 20 is the pre-update point: excluded; P8's 0.3 belongs to experience 2: excluded)
    # min = 0.4; mean over one earlier experience = 0.4
    assert min_acc(make_trace(), 1) == pytest.approx(0.4)


def test_min_acc_while_learning_experience_2():
    # exp 0 (end 20): P5 0.6, P6 0.4, P7 0.4, P8 0.3, P9 0.8 -> min 0.3
    # exp 1 (end 40): P8 0.2, P9 0.7 (P7 at iteration 40 excluded)        -> min 0.2
    # mean (0.3 + 0.2) / 2 = 0.25
    assert min_acc(make_trace(), 2) == pytest.approx(0.25)


def test_min_acc_excludes_pre_update_point_and_own_training():
    t = ContinualTrace()
    t.add(0, 0, {0: 0.1})           # while learning exp 0: not "after" its training
    t.add(10, 0, {0: 0.9})          # end of exp 0: iteration 10
    t.add(10, 1, {0: 0.2, 1: 0.0})  # pre-update point, made the lowest on purpose
    t.add(20, 1, {0: 0.6, 1: 0.7})
    # only iteration 20 > 10 counts: min-ACC = 0.6 (0.2 would mean the pre-update point was
    # counted, 0.1 that the experience's own training was)
    assert min_acc(t, 1) == pytest.approx(0.6)


def test_wc_acc_first_experience_is_latest_accuracy():
    # k = 1: WC-ACC = A_1 = latest accuracy on exp 0 while learning it = P3 = 0.9
    assert wc_acc(make_trace(), 0) == pytest.approx(0.9)


def test_wc_acc_later_experiences():
    t = make_trace()
    # k = 2: A_2 = P6[1] = 0.8, min-ACC = 0.4: 0.8/2 + (1 - 1/2)*0.4 = 0.4 + 0.2 = 0.6
    assert wc_acc(t, 1) == pytest.approx(0.6)
    # k = 3: A_3 = P9[2] = 0.9, min-ACC = 0.25: 0.9/3 + (2/3)*0.25 = 0.3 + 0.1666.. = 0.4666..
    assert wc_acc(t, 2) == pytest.approx(0.9 / 3 + (2 / 3) * 0.25)
    assert wc_acc(t, 2) == pytest.approx(0.4666666667)


def test_wc_acc_none_without_points_of_current_experience():
    assert wc_acc(make_trace(), 3) is None


def test_windowed_forgetting_window_2():
    t = make_trace()
    # window 2: consecutive pairs (b - a = 1) only
    # exp 0: drops 0.9->0.6 (P4->P5) 0.3, 0.6->0.4 0.2, 0.4->0.3 0.1       -> 0.3
    # exp 1: drop 0.8->0.2 (P7->P8) 0.6                                    -> 0.6
    # exp 2: 0.0, 0.6, 0.9 never drops                                      -> 0
    # mean over exps 0..2 (the current one included): (0.3 + 0.6 + 0) / 3 = 0.3
    assert windowed_forgetting(t, 2, 2) == pytest.approx(0.3)


def test_windowed_forgetting_window_3():
    t = make_trace()
    # window 3: pairs with b - a <= 2
    # exp 0: adds 0.9 (P4) -> 0.4 (P6) = 0.5, 0.9 (P3) -> 0.6 (P5) = 0.3 ... max 0.5
    # exp 1: 0.8 (P6) -> 0.2 (P8) = 0.6, 0.8 (P7) -> 0.7 (P9) = 0.1 ... max 0.6
    # exp 2: 0
    # mean (0.5 + 0.6 + 0) / 3 = 1.1 / 3 = 0.3666..
    assert windowed_forgetting(t, 2, 3) == pytest.approx(1.1 / 3)


def test_windowed_forgetting_earlier_currents():
    t = make_trace()
    # current 0: exp 0 series up to P3: [0.2, 0.6, 0.9] never drops -> 0
    assert windowed_forgetting(t, 0, 2) == 0.0
    # current 1: points with experience <= 1 (P1..P6)
    #   exp 0: [0.2, 0.6, 0.9, 0.9, 0.6, 0.4]; w2: max(0.3, 0.2) = 0.3; w3: 0.9 (P4) -> 0.4 (P6) = 0.5
    #   exp 1: [0.1, 0.5, 0.8] -> 0 (still averaged in: the current experience counts)
    # w2: (0.3 + 0) / 2 = 0.15; w3: (0.5 + 0) / 2 = 0.25
    assert windowed_forgetting(t, 1, 2) == pytest.approx(0.15)
    assert windowed_forgetting(t, 1, 3) == pytest.approx(0.25)


def test_windowed_plasticity():
    t = make_trace()
    # window 2 (largest consecutive gain):
    #   exp 0: 0.2->0.6 0.4, 0.6->0.9 0.3, 0.3->0.8 (P8->P9) 0.5  -> 0.5
    #   exp 1: 0.1->0.5 0.4, 0.5->0.8 0.3, 0.2->0.7 0.5           -> 0.5
    #   exp 2: 0.0->0.6 0.6, 0.6->0.9 0.3                         -> 0.6
    #   mean (0.5 + 0.5 + 0.6) / 3 = 1.6 / 3
    assert windowed_plasticity(t, 2, 2) == pytest.approx(1.6 / 3)
    # window 3 (b - a <= 2):
    #   exp 0: 0.2 (P1) -> 0.9 (P3) 0.7                            -> 0.7
    #   exp 1: 0.1 (P4) -> 0.8 (P6) 0.7                            -> 0.7
    #   exp 2: 0.0 (P7) -> 0.9 (P9) 0.9                            -> 0.9
    #   mean (0.7 + 0.7 + 0.9) / 3 = 2.3 / 3
    assert windowed_plasticity(t, 2, 3) == pytest.approx(2.3 / 3)


def test_windowed_on_empty_trace_is_none():
    assert windowed_forgetting(ContinualTrace(), 0, 2) is None
    assert windowed_plasticity(ContinualTrace(), 0, 2) is None


def test_continual_summary_keys_and_values():
    s = continual_summary(make_trace(), 2)
    assert set(s) == {"min_acc", "wc_acc", "wf_10", "wf_100"}
    assert s["min_acc"] == pytest.approx(0.25)
    assert s["wc_acc"] == pytest.approx(0.9 / 3 + (2 / 3) * 0.25)
    # windows 10 and 100 cover every series (at most 9 points): largest drop a before b
    #   exp 0: 0.9 (P3) -> 0.3 (P8) = 0.6; exp 1: 0.8 -> 0.2 = 0.6; exp 2: 0
    #   mean (0.6 + 0.6 + 0) / 3 = 0.4
    assert s["wf_10"] == pytest.approx(0.4)
    assert s["wf_100"] == pytest.approx(0.4)


def test_continual_summary_leaves_out_none():
    # current 0: min-ACC is None, so it is left out
    s = continual_summary(make_trace(), 0)
    assert set(s) == {"wc_acc", "wf_10", "wf_100"}
    assert s["wc_acc"] == pytest.approx(0.9)
    assert s["wf_10"] == 0.0
    assert continual_summary(ContinualTrace(), 0) == {}
