"""lmadapt.eval.metrics (continual-learning metrics) and lmadapt.eval.classification (classification metrics,
tables) against hand-computed values."""

import csv
import io
import json

import numpy as np
import pytest

from lmadapt.eval.classification import classification_report, csv_text, markdown_table
from lmadapt.eval.metrics import (
    ContinualReport,
    average_score,
    backward_transfer,
    continual_report,
    forgetting,
    forward_transfer,
    gap_to_reference,
)

# One scenario, three tasks learned in order, version i trained on task i, no base model. The model learns each
# task well and then partly forgets it; earlier training helps a little on tasks not yet seen.
ACC = [
    [0.90, 0.30, 0.20],  # v0: after task 0
    [0.70, 0.85, 0.40],  # v1: after task 1 (task 0 dropped 0.90 -> 0.70)
    [0.60, 0.75, 0.80],  # v2: after task 2
]
ACC_BASELINE = [0.25, 0.25, 0.25]  # e.g. a randomly initialised model
# The same scenario as losses: loss = 4 * (1 - accuracy). All transfer metrics scale by 4 and keep their signs.
LOSS = (4.0 * (1.0 - np.array(ACC))).tolist()  # [[0.4, 2.8, 3.2], [1.2, 0.6, 2.4], [1.6, 1.0, 0.8]]
LOSS_BASELINE = [3.0, 3.0, 3.0]
TRAINED = [0, 1, 2]


def test_scenario_losses_are_what_the_comments_say():
    np.testing.assert_allclose(LOSS, [[0.4, 2.8, 3.2], [1.2, 0.6, 2.4], [1.6, 1.0, 0.8]], atol=1e-12)


def test_average_score():
    assert average_score(ACC, TRAINED) == pytest.approx((0.60 + 0.75 + 0.80) / 3)
    assert average_score(LOSS, TRAINED) == pytest.approx((1.6 + 1.0 + 0.8) / 3)
    # Only the tasks seen so far count; None and repeats are ignored, so a trained_on list can be passed as is.
    assert average_score(ACC, [None, 0, 1, 0]) == pytest.approx((0.60 + 0.75) / 2)


def test_backward_transfer_is_negative_for_forgetting_in_both_conventions():
    # GEM: mean over tasks 0, 1 of R[2][j] - R[j][j] = ((0.60 - 0.90) + (0.75 - 0.85)) / 2.
    assert backward_transfer(ACC, TRAINED, higher_is_better=True) == pytest.approx(-0.20)
    # Losses: -((1.6 - 0.4) + (1.0 - 0.6)) / 2; losses went up, so BWT is negative as well.
    assert backward_transfer(LOSS, TRAINED, higher_is_better=False) == pytest.approx(-0.80)


def test_backward_transfer_is_positive_when_later_training_helps():
    acc = [[0.5, 0.1], [0.7, 0.9]]  # task 0 improved from 0.5 to 0.7 while learning task 1
    assert backward_transfer(acc, [0, 1], True) == pytest.approx(0.2)
    loss = [[2.0, 5.0], [1.5, 1.0]]  # task 0's loss went down
    assert backward_transfer(loss, [0, 1], False) == pytest.approx(0.5)


def test_forward_transfer_with_a_baseline_vector():
    # GEM: mean over tasks 1, 2 of R[j-1][j] - b[j] = ((0.30 - 0.25) + (0.40 - 0.25)) / 2.
    assert forward_transfer(ACC, TRAINED, ACC_BASELINE, True) == pytest.approx(0.10)
    # Losses: -((2.8 - 3.0) + (2.4 - 3.0)) / 2; zero-shot losses below the baseline -> positive FWT as well.
    assert forward_transfer(LOSS, TRAINED, LOSS_BASELINE, False) == pytest.approx(0.40)
    # The baseline is per task: only b[1] and b[2] matter (the first task has no "before" model).
    expected = ((0.30 - 0.30) + (0.40 - 0.50)) / 2
    assert forward_transfer(ACC, TRAINED, [99.0, 0.30, 0.50], True) == pytest.approx(expected)


def test_forward_transfer_against_a_base_model_row():
    # Row 0 is the base model (trained on nothing); baseline=0 measures transfer relative to it.
    acc = [
        [0.20, 0.30, 0.10],  # base
        [0.90, 0.40, 0.15],  # after task 0
        [0.80, 0.85, 0.35],  # after task 1
        [0.70, 0.80, 0.90],  # after task 2
    ]
    trained = [None, 0, 1, 2]
    # Tasks 1 and 2 (task 0 is the first learned): (R[1][1] - R[0][1] + R[2][2] - R[0][2]) / 2.
    assert forward_transfer(acc, trained, 0, True) == pytest.approx(((0.40 - 0.30) + (0.35 - 0.10)) / 2)
    # The same, with the base row passed as an explicit vector.
    assert forward_transfer(acc, trained, acc[0], True) == pytest.approx(((0.40 - 0.30) + (0.35 - 0.10)) / 2)


def test_forgetting_is_positive_for_forgetting_in_both_conventions():
    per_task, mean = forgetting(ACC, TRAINED, higher_is_better=True)
    # Task 0: max(0.90, 0.70) - 0.60; task 1: 0.85 - 0.75. Task 2 was learned last: not included.
    assert per_task == pytest.approx({0: 0.30, 1: 0.10})
    assert mean == pytest.approx(0.20)
    per_task, mean = forgetting(LOSS, TRAINED, higher_is_better=False)
    # Task 0: 1.6 - min(0.4, 1.2); task 1: 1.0 - 0.6.
    assert per_task == pytest.approx({0: 1.2, 1: 0.4})
    assert mean == pytest.approx(0.8)


def test_forgetting_uses_the_peak_not_the_score_right_after_learning():
    # Task 0 kept improving after it was learned (0.6 -> 0.9), then dropped to 0.5: forgetting is from the peak.
    acc = [[0.6, 0.1, 0.1], [0.9, 0.8, 0.2], [0.5, 0.7, 0.9]]
    per_task, _ = forgetting(acc, [0, 1, 2], True)
    assert per_task == pytest.approx({0: 0.4, 1: 0.1})
    # No forgetting at all (scores only went up) gives <= 0 in both conventions.
    per_task, mean = forgetting([[0.5, 0.1], [0.6, 0.9]], [0, 1], True)
    assert per_task == pytest.approx({0: -0.1}) and mean == pytest.approx(-0.1)
    per_task, mean = forgetting([[2.0, 5.0], [1.5, 1.0]], [0, 1], False)
    assert mean == pytest.approx(-0.5)


def test_forgetting_ignores_scores_from_before_the_task_was_learned():
    # A strong base (row 0) already scores 0.95 on task 0; fine-tuning on task 0 then task 1 lowers it.
    # That drop from the base is transfer, not forgetting of something learned: only rows >= first(0) count.
    acc = [[0.95, 0.2], [0.90, 0.3], [0.80, 0.9]]
    per_task, _ = forgetting(acc, [None, 0, 1], True)
    assert per_task == pytest.approx({0: 0.10})


def test_repeated_tasks_and_untrained_final_version():
    acc = [[0.8, 0.2], [0.6, 0.9], [0.85, 0.7]]
    # Task 0 retrained by the final version: only task 1 is "previously learned"; its after-learning score is R[1].
    assert backward_transfer(acc, [0, 1, 0], True) == pytest.approx(0.7 - 0.9)
    assert forgetting(acc, [0, 1, 0], True) == (pytest.approx({1: 0.2}), pytest.approx(0.2))
    # FWT counts only the first time each task is learned: task 1 at version 1, zero-shot score R[0][1].
    assert forward_transfer(acc, [0, 1, 0], [0.5, 0.5], True) == pytest.approx(0.2 - 0.5)
    # A final version trained on nothing (e.g. a merge): both tasks are previously learned.
    assert backward_transfer(acc, [0, 1, None], True) == pytest.approx(((0.85 - 0.8) + (0.7 - 0.9)) / 2)
    assert forgetting(acc, [0, 1, None], True)[0] == pytest.approx({0: 0.8 - 0.85, 1: 0.9 - 0.7})


def test_gap_to_reference():
    assert gap_to_reference(1.1, 1.0, higher_is_better=False) == pytest.approx(0.10)  # 10% more loss: worse
    assert gap_to_reference(0.9, 1.0, higher_is_better=False) == pytest.approx(-0.10)  # less loss: better
    assert gap_to_reference(0.72, 0.80, higher_is_better=True) == pytest.approx(0.10)  # lower accuracy: worse
    assert gap_to_reference(0.88, 0.80, higher_is_better=True) == pytest.approx(-0.10)
    # Sequences are averaged first: mean loss 1.2 vs 1.0.
    assert gap_to_reference([1.0, 1.4], [0.8, 1.2], higher_is_better=False) == pytest.approx(0.20)
    with pytest.raises(ValueError, match="reference of 0"):
        gap_to_reference(1.0, 0.0, False)
    with pytest.raises(ValueError, match="non-empty"):
        gap_to_reference([], 1.0, False)
    with pytest.raises(ValueError, match="finite"):
        gap_to_reference(float("nan"), 1.0, False)


@pytest.mark.parametrize(
    "R, trained, match",
    [
        ([0.1, 0.2], [0], "2-D"),
        ([[0.1, 0.2], [0.3]], [0, 1], "rectangular"),
        ([[]], [0], "at least one version and one task"),
        ([[0.1, float("nan")], [0.3, 0.4]], [0, 1], r"non-finite value at version 0, task 1"),
        ([[0.1, 0.2], [0.3, 0.4]], [0], "trained_on has 1 entries but R has 2 versions"),
        ([[0.1, 0.2], [0.3, 0.4]], [0, 2], r"trained_on\[1\] = 2 is out of range for 2 tasks"),
        ([[0.1, 0.2], [0.3, 0.4]], [0, -1], r"trained_on\[1\] = -1 is out of range"),
        ([[0.1, 0.2], [0.3, 0.4]], [0, True], r"trained_on\[1\] must be a task index or None"),
        ([[0.1, 0.2], [0.3, 0.4]], [0, "b"], r"trained_on\[1\] must be a task index or None"),
    ],
)
def test_shape_and_index_errors(R, trained, match):
    for call in (
        lambda: backward_transfer(R, trained, True),
        lambda: forgetting(R, trained, True),
        lambda: forward_transfer(R, trained, [0.0, 0.0], True),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_undefined_metrics_and_bad_baselines():
    with pytest.raises(ValueError, match="at least one task learned before the final version"):
        backward_transfer([[0.5, 0.1]], [0], True)
    with pytest.raises(ValueError, match="at least one task learned before the final version"):
        forgetting([[0.2, 0.1], [0.5, 0.1]], [None, 0], True)
    with pytest.raises(ValueError, match="at least two learned tasks"):
        forward_transfer([[0.2, 0.1], [0.5, 0.1]], [None, 0], 0, True)
    with pytest.raises(ValueError, match=r"one value per task \(3\)"):
        forward_transfer(ACC, TRAINED, [0.25, 0.25], True)
    with pytest.raises(ValueError, match="baseline row 5 is out of range"):
        forward_transfer(ACC, TRAINED, 5, True)
    with pytest.raises(ValueError, match="at least one trained task"):
        average_score(ACC, [None])
    with pytest.raises(ValueError, match=r"trained_tasks\[0\] = 3"):
        average_score(ACC, [3])


def test_continual_report_bundles_everything():
    rep = continual_report(ACC, ["v0", "v1", "v2"], ["a", "b", "c"], TRAINED, True, ACC_BASELINE, reference=0.8)
    assert isinstance(rep, ContinualReport)
    assert rep.learned_tasks == ["a", "b", "c"]
    assert rep.trained_on == ["a", "b", "c"]
    assert rep.average_score == pytest.approx(2.15 / 3)
    assert rep.backward_transfer == pytest.approx(-0.20)
    assert rep.forward_transfer == pytest.approx(0.10)
    assert rep.forgetting == pytest.approx({"a": 0.30, "b": 0.10})
    assert rep.mean_forgetting == pytest.approx(0.20)
    assert rep.final_scores == pytest.approx({"a": 0.60, "b": 0.75, "c": 0.80})
    assert rep.gap_to_reference == pytest.approx((0.8 - 2.15 / 3) / 0.8)
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready: only plain types
    assert d["matrix"] == pytest.approx(np.array(ACC))
    assert d["higher_is_better"] is True

    loss = continual_report(LOSS, ["v0", "v1", "v2"], ["a", "b", "c"], TRAINED, False, LOSS_BASELINE)
    assert loss.backward_transfer == pytest.approx(-0.80) and loss.mean_forgetting == pytest.approx(0.80)
    assert loss.forward_transfer == pytest.approx(0.40) and loss.gap_to_reference is None


def test_continual_report_undefined_metrics_are_none():
    # Base + one fine-tune: ACC is defined; BWT, forgetting and FWT are not.
    rep = continual_report([[3.0, 3.1], [1.0, 2.9]], ["base", "ft"], ["a", "b"], [None, 0], False, baseline=0)
    assert rep.trained_on == [None, "a"]
    assert rep.average_score == pytest.approx(1.0)
    assert rep.backward_transfer is None and rep.forward_transfer is None
    assert rep.forgetting == {} and rep.mean_forgetting is None
    # Nothing trained at all.
    rep = continual_report([[3.0]], ["base"], ["a"], [None], False)
    assert rep.average_score is None and rep.learned_tasks == []
    # No baseline: no FWT, even with enough tasks.
    assert continual_report(ACC, ["v0", "v1", "v2"], ["a", "b", "c"], TRAINED, True).forward_transfer is None


def test_continual_report_validates_names_and_baseline():
    with pytest.raises(ValueError, match="2 version names for 3 versions"):
        continual_report(ACC, ["v0", "v1"], ["a", "b", "c"], TRAINED, True)
    with pytest.raises(ValueError, match="2 task names for 3 tasks"):
        continual_report(ACC, ["v0", "v1", "v2"], ["a", "b"], TRAINED, True)
    with pytest.raises(ValueError, match="unique"):
        continual_report(ACC, ["v0", "v0", "v2"], ["a", "b", "c"], TRAINED, True)
    with pytest.raises(ValueError, match="one value per task"):
        continual_report(ACC, ["v0", "v1", "v2"], ["a", "b", "c"], TRAINED, True, baseline=[0.1])


def test_classification_report_by_hand():
    # Confusion matrix (rows = true, cols = predicted), class "c" is never predicted:
    #        a  b  c
    #   a  [ 3, 1, 0 ]   support 4
    #   b  [ 1, 2, 0 ]   support 3
    #   c  [ 1, 2, 0 ]   support 3
    pairs = [("a", "a")] * 3 + [("a", "b")] + [("b", "a")] + [("b", "b")] * 2 + [("c", "a")] + [("c", "b")] * 2
    y_true, y_pred = zip(*pairs, strict=True)
    rep = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert rep["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [1, 2, 0]]
    assert rep["accuracy"] == pytest.approx(5 / 10)
    assert rep["support"] == 10
    assert rep["labels"] == ["a", "b", "c"]
    a, b, c = rep["per_class"]
    # precision = tp / predicted (column sum), recall = tp / support (row sum), F1 = harmonic mean.
    assert (a["label"], a["precision"], a["recall"], a["support"]) == ("a", pytest.approx(3 / 5), 0.75, 4)
    assert a["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))  # 2/3
    assert (b["precision"], b["recall"], b["support"]) == (pytest.approx(2 / 5), pytest.approx(2 / 3), 3)
    assert b["f1"] == pytest.approx(0.5)
    # Never predicted: precision 0 by convention (not NaN), recall 0/3, F1 0.
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 3)
    assert rep["macro_precision"] == pytest.approx((0.6 + 0.4 + 0.0) / 3)
    assert rep["macro_recall"] == pytest.approx((0.75 + 2 / 3 + 0.0) / 3)
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    json.dumps(rep)  # plain types only


def test_classification_report_int_labels_order_and_errors():
    # The labels argument fixes the row/column order, and labels with no examples still count in the macro mean.
    rep = classification_report([1, 0, 1], [1, 0, 0], labels=[1, 0, 2])
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert [c["label"] for c in rep["per_class"]] == [1, 0, 2]
    assert rep["per_class"][2] == {"label": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep["macro_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="y_true has 2 items but y_pred has 1"):
        classification_report([0, 1], [0], [0, 1])
    with pytest.raises(ValueError, match="y_pred has labels not in"):
        classification_report([0, 1], [0, 7], [0, 1])
    with pytest.raises(ValueError, match="at least one example"):
        classification_report([], [], [0, 1])
    with pytest.raises(ValueError, match="unique"):
        classification_report([0], [0], [0, 0])


def test_markdown_table():
    rows = [{"name": "a", "x": 0.123456, "n": 3, "extra": "ignored"}, {"name": "b|c", "x": 12345.678},
            {"name": "d", "x": np.float32(2.0), "n": None}]
    assert markdown_table(rows, ["name", "x", "n"]) == (
        "| name | x | n |\n"
        "|---|---|---|\n"
        "| a | 0.1235 | 3 |\n"
        "| b\\|c | 1.235e+04 |  |\n"
        "| d | 2 |  |\n"
    )
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table(rows, [])


def test_csv_text_round_trips():
    rows = [{"name": "a, with comma", "x": 0.123456789, "n": 3, "extra": 1}, {"name": 'quote "q"', "x": 1.5}]
    text = csv_text(rows, ["name", "x", "n"])
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed == [["name", "x", "n"], ["a, with comma", "0.123456789", "3"], ['quote "q"', "1.5", ""]]
    assert text.endswith("\n") and "\r" not in text
