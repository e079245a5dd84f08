"""Continual-learning metrics of a sequence of model versions (numpy only, no JAX).

The inputs describe an ordered list of model versions ``v_0 .. v_{n-1}`` (the chronological lineage: each
version was derived from the one before it) evaluated on tasks (datasets) ``t_0 .. t_{m-1}``:

* ``R`` is an ``n x m`` matrix, ``R[i][j]`` = score of version ``i`` on task ``j``.
* ``trained_on[i]`` is the index of the task version ``i`` was trained on, or ``None`` for a version that was
  not trained on a task (the base model in row 0, a merge, ...).
* ``higher_is_better`` picks the convention: ``True`` for accuracies, ``False`` for losses / perplexities.
  Write ``s = +1`` if higher is better else ``s = -1``. Every transfer metric is multiplied by ``s`` so that its
  sign means the same thing in both conventions.

The *final* version is the last row, ``F = n - 1``. A task ``j`` is *learned* if some version was trained on it;
``first(j)`` / ``last(j)`` are the first / last such versions. The learned tasks are ordered by ``first(j)``
(the learning order), and ``T`` is their number. The *previously learned* tasks are the learned tasks with
``last(j) < F``: every learned task except the one the final version has just been trained on (for which the
quantities below are zero by construction). In the GEM setting (one version per task, no base, no repeats)
these are exactly the first ``T - 1`` tasks, so the formulas reduce to the published ones.

``average_score``  (ACC, Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory")::

    ACC = 1/T * sum_{j learned} R[F][j]

  The plain mean of the final version's scores (no sign conversion: it is a score in the input's units).

``backward_transfer``  (BWT, GEM)::

    BWT = s * 1/|P| * sum_{j in P} (R[F][j] - R[last(j)][j])          P = previously learned tasks

  Positive BWT: later training *improved* earlier tasks; negative BWT: it hurt them (forgetting). For losses
  this is ``-(loss_final - loss_after_learning)``, so a loss that went up gives a negative BWT, as an accuracy
  that went down does.

``forward_transfer``  (FWT, GEM)::

    FWT = s * 1/(T-1) * sum_{j learned, j != first learned task} (R[first(j) - 1][j] - b[j])

  ``R[first(j) - 1][j]`` is the score on task ``j`` of the version just before the one first trained on it
  (zero-shot on ``j``); ``b`` is a per-task baseline (e.g. the base model's row, or a randomly initialised
  model). The first learned task is left out, as in GEM (where it has no predecessor). Positive FWT: what was
  learned before helped on tasks not yet seen.

``forgetting``  (Chaudhry et al. 2018, "Riemannian Walk")::

    f_j = max_{first(j) <= l < F} s * R[l][j]  -  s * R[F][j]            for j in P
        = max_l R[l][j] - R[F][j]       (accuracies)
        = R[F][j] - min_l R[l][j]       (losses)

  Positive = forgot (the final version is worse than the best the task ever was since it was learned); the
  mean is over ``P``. Rows before ``first(j)`` are left out on purpose: a score the model had *before* it ever
  learned the task (e.g. a strong pretrained base) is transfer, not knowledge acquired and then lost. When the
  pre-learning scores are below the post-learning peak (the usual case), this equals Chaudhry's max over all
  earlier rows.

``gap_to_reference``::

    gap = s * (mean(reference) - mean(scores)) / |mean(reference)|

  A fraction, positive = worse than the reference (e.g. the final average loss vs. a joint retrain on all data).

Metrics that are undefined for the given inputs (BWT / forgetting with no previously learned task, FWT with fewer
than two learned tasks) raise ``ValueError``; ``continual_report`` records them as ``None``.

Classification metrics and the report's tables are in `lmadapt.eval.classification`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# A score matrix as given by callers: nested sequences or an array.
Matrix = Sequence[Sequence[float]] | np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _as_matrix(R: Matrix) -> np.ndarray:
    """`R` as a finite float (n, m) array with n, m >= 1, or a ValueError that says what is wrong."""
    try:
        arr = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as e:  # ragged rows, non-numbers
        raise ValueError(f"R must be a rectangular matrix of numbers (versions x tasks): {e}") from e
    if arr.ndim != 2:
        raise ValueError(f"R must be 2-D (versions x tasks), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"R must have at least one version and one task, got shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"R has a non-finite value at version {i}, task {j}: {arr[i, j]}")
    return arr


def _is_index(x: Any) -> bool:
    # bool is an int subclass, but True/False as a task index is almost certainly a bug.
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _check_trained_on(trained_on: Sequence[int | None], n_versions: int, n_tasks: int) -> list[int | None]:
    """`trained_on` as a list of task indices / None, one per version, all in range."""
    trained = list(trained_on)
    if len(trained) != n_versions:
        raise ValueError(f"trained_on has {len(trained)} entries but R has {n_versions} versions (rows)")
    for i, t in enumerate(trained):
        if t is None:
            continue
        if not _is_index(t):
            raise ValueError(f"trained_on[{i}] must be a task index or None, got {t!r}")
        if not 0 <= t < n_tasks:
            raise ValueError(f"trained_on[{i}] = {t} is out of range for {n_tasks} tasks")
    return [None if t is None else int(t) for t in trained]


def _learned_spans(trained: list[int | None]) -> dict[int, tuple[int, int]]:
    """task -> (first, last) version trained on it, in learning order (by first version)."""
    spans: dict[int, tuple[int, int]] = {}
    for i, t in enumerate(trained):
        if t is not None:
            spans[t] = (spans[t][0], i) if t in spans else (i, i)
    return spans  # dicts keep insertion order, which is the order of first training


def _previously_learned(spans: dict[int, tuple[int, int]], final: int) -> list[int]:
    """Learned tasks whose last training happened before the final version (the set P of the docstring)."""
    return [t for t, (_, last) in spans.items() if last < final]


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


# ----------------------------------------------------------------------------------------------------------------
# Continual-learning metrics
# ----------------------------------------------------------------------------------------------------------------


def average_score(R: Matrix, trained_tasks: Sequence[int | None]) -> float:
    """ACC: mean of the final version's (last row's) scores over the distinct tasks in `trained_tasks`.

    `trained_tasks` lists the tasks seen so far; `None` entries are ignored and repeats count once, so a
    `trained_on` list can be passed as is.
    """
    arr = _as_matrix(R)
    tasks: list[int] = []
    for k, t in enumerate(trained_tasks):
        if t is None:
            continue
        if not _is_index(t) or not 0 <= t < arr.shape[1]:
            raise ValueError(f"trained_tasks[{k}] = {t!r} is not a task index in [0, {arr.shape[1]})")
        if int(t) not in tasks:
            tasks.append(int(t))
    if not tasks:
        raise ValueError("average_score needs at least one trained task")
    return float(arr[-1, tasks].mean())


def _before_final(R: Matrix, trained_on: Sequence[int | None], what: str
                  ) -> tuple[np.ndarray, dict[int, tuple[int, int]], int, list[int]]:
    """(R, learned spans, final row, tasks learned before the final version); an error if there are none."""
    arr = _as_matrix(R)
    spans = _learned_spans(_check_trained_on(trained_on, *arr.shape))
    final = arr.shape[0] - 1
    prev = _previously_learned(spans, final)
    if not prev:
        raise ValueError(f"{what} needs at least one task learned before the final version")
    return arr, spans, final, prev


def backward_transfer(R: Matrix, trained_on: Sequence[int | None], higher_is_better: bool) -> float:
    """BWT (GEM): s * mean over previously learned tasks j of (R[final][j] - R[last(j)][j]); > 0 = improved."""
    arr, spans, final, prev = _before_final(R, trained_on, "backward_transfer")
    diffs = [arr[final, j] - arr[spans[j][1], j] for j in prev]
    return float(_sign(higher_is_better) * np.mean(diffs))


def _baseline_vector(baseline: int | Sequence[float] | np.ndarray, arr: np.ndarray) -> np.ndarray:
    """A per-task baseline: an int picks a row of R (e.g. 0 for the base model), else one value per task."""
    if _is_index(baseline):
        row = int(baseline)  # type: ignore[arg-type]
        if not -arr.shape[0] <= row < arr.shape[0]:
            raise ValueError(f"baseline row {row} is out of range for {arr.shape[0]} versions")
        return arr[row]
    try:
        b = np.asarray(baseline, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"baseline must be a row index or one number per task: {e}") from e
    if b.shape != (arr.shape[1],):
        raise ValueError(f"baseline must have one value per task ({arr.shape[1]}), got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("baseline has non-finite values")
    return b


def forward_transfer(
    R: Matrix,
    trained_on: Sequence[int | None],
    baseline: int | Sequence[float] | np.ndarray,
    higher_is_better: bool,
) -> float:
    """FWT (GEM): s * mean over learned tasks j but the first of (R[first(j) - 1][j] - b[j]); > 0 = helped.

    `baseline` is one score per task (e.g. a randomly initialised model's) or an int row index into `R`
    (e.g. ``0`` for a base model evaluated in row 0).
    """
    arr = _as_matrix(R)
    trained = _check_trained_on(trained_on, *arr.shape)
    b = _baseline_vector(baseline, arr)
    spans = _learned_spans(trained)
    later = list(spans.items())[1:]  # the first learned task has no "before" model in GEM's setting
    if not later:
        raise ValueError("forward_transfer needs at least two learned tasks")
    diffs = [arr[first - 1, j] - b[j] for j, (first, _) in later]
    return float(_sign(higher_is_better) * np.mean(diffs))


def forgetting(
    R: Matrix, trained_on: Sequence[int | None], higher_is_better: bool
) -> tuple[dict[int, float], float]:
    """Forgetting (Chaudhry et al. 2018): per previously learned task, best score since learning minus final.

    Returns ``({task_index: f_j}, mean_j f_j)``; positive = forgot, in both conventions.
    """
    arr, spans, final, prev = _before_final(R, trained_on, "forgetting")
    s = _sign(higher_is_better)
    # s * R turns both conventions into "higher is better", so one max covers max-accuracy and min-loss.
    per_task = {j: float(np.max(s * arr[spans[j][0]:final, j]) - s * arr[final, j]) for j in prev}
    return per_task, float(np.mean(list(per_task.values())))


def gap_to_reference(
    scores: float | Sequence[float] | np.ndarray,
    reference: float | Sequence[float] | np.ndarray,
    higher_is_better: bool,
) -> float:
    """Relative gap of `scores` to `reference` as a fraction of |reference|; positive = worse than reference.

    Sequences are averaged first (e.g. final per-task losses vs. the joint retrain's per-task losses gives the
    gap of the average loss).
    """
    s_arr = np.atleast_1d(np.asarray(scores, dtype=np.float64))
    r_arr = np.atleast_1d(np.asarray(reference, dtype=np.float64))
    if s_arr.ndim != 1 or r_arr.ndim != 1 or s_arr.size == 0 or r_arr.size == 0:
        raise ValueError(f"scores and reference must be numbers or non-empty 1-D sequences, "
                         f"got shapes {s_arr.shape} and {r_arr.shape}")
    if not (np.all(np.isfinite(s_arr)) and np.all(np.isfinite(r_arr))):
        raise ValueError("scores and reference must be finite")
    s_mean, r_mean = float(s_arr.mean()), float(r_arr.mean())
    if r_mean == 0.0:
        raise ValueError("gap_to_reference is undefined for a reference of 0")
    return _sign(higher_is_better) * (r_mean - s_mean) / abs(r_mean)


@dataclass
class ContinualReport:
    """All continual-learning metrics of one run, keyed by names; `None` where a metric is undefined."""

    version_names: list[str]
    task_names: list[str]
    trained_on: list[str | None]  # task name per version (None: not trained on a task)
    higher_is_better: bool
    matrix: list[list[float]]  # R, rows = versions, columns = tasks
    learned_tasks: list[str]  # in learning order
    final_scores: dict[str, float]  # R[final][j] for every task
    average_score: float | None
    backward_transfer: float | None
    forward_transfer: float | None
    forgetting: dict[str, float] = field(default_factory=dict)  # previously learned tasks only
    mean_forgetting: float | None = None
    gap_to_reference: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain lists, dicts, floats, strings, None)."""
        return asdict(self)


def _undefined_as_none(fn, *args) -> Any:
    # Only "undefined for these inputs" errors become None; input validation already ran in continual_report.
    try:
        return fn(*args)
    except ValueError:
        return None


def continual_report(
    R: Matrix,
    version_names: Sequence[str],
    task_names: Sequence[str],
    trained_on: Sequence[int | None],
    higher_is_better: bool,
    baseline: int | Sequence[float] | np.ndarray | None = None,
    *,
    reference: float | Sequence[float] | np.ndarray | None = None,
) -> ContinualReport:
    """Bundle ACC, BWT, FWT, forgetting and (optionally) the gap to a reference into a `ContinualReport`.

    FWT is computed only if `baseline` is given (a row index such as 0 for the base model, or one score per
    task). `reference`, if given, is compared with the final version's mean score on the learned tasks via
    `gap_to_reference` (a number, or scores that are averaged first, e.g. a joint retrain's per-task losses).
    """
    arr = _as_matrix(R)
    n, m = arr.shape
    versions, tasks = [str(v) for v in version_names], [str(t) for t in task_names]
    if len(versions) != n:
        raise ValueError(f"{len(versions)} version names for {n} versions (rows of R)")
    if len(tasks) != m:
        raise ValueError(f"{len(tasks)} task names for {m} tasks (columns of R)")
    if len(set(versions)) != n or len(set(tasks)) != m:
        raise ValueError("version names and task names must be unique")
    trained = _check_trained_on(trained_on, n, m)
    if baseline is not None:
        _baseline_vector(baseline, arr)  # validate now, so a bad baseline is an error rather than a None FWT
    spans = _learned_spans(trained)
    learned = list(spans)

    acc = average_score(arr, learned) if learned else None
    bwt = _undefined_as_none(backward_transfer, arr, trained, higher_is_better)
    fwt = None if baseline is None else _undefined_as_none(forward_transfer, arr, trained, baseline, higher_is_better)
    forg = _undefined_as_none(forgetting, arr, trained, higher_is_better)
    gap = None
    if reference is not None and learned:
        gap = gap_to_reference(arr[-1, learned], reference, higher_is_better)
    return ContinualReport(
        version_names=versions,
        task_names=tasks,
        trained_on=[None if t is None else tasks[t] for t in trained],
        higher_is_better=bool(higher_is_better),
        matrix=arr.tolist(),
        learned_tasks=[tasks[j] for j in learned],
        final_scores={tasks[j]: float(arr[-1, j]) for j in range(m)},
        average_score=acc,
        backward_transfer=bwt,
        forward_transfer=fwt,
        forgetting={} if forg is None else {tasks[j]: f for j, f in forg[0].items()},
        mean_forgetting=None if forg is None else forg[1],
        gap_to_reference=gap,
    )
