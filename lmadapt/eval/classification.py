"""Classification metrics of a probe and the tables eval reports are written as (numpy only, no JAX).

``classification_report`` gives accuracy, per-class precision / recall / F1 and support, their unweighted (macro)
means over *all* given labels, and the confusion matrix (rows = true label, columns = predicted label, both in
``labels`` order). A ratio with a zero denominator is 0: a class that is never predicted has precision 0, a class
with no true examples has recall 0, and F1 is 0 when precision + recall is 0 (scikit-learn's ``zero_division=0``).

``markdown_table`` and ``csv_text`` write rows of results (dicts) restricted to given columns.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Classification metrics
# ----------------------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    # The zero_division=0 convention of the module docstring.
    return float(num / den) if den else 0.0


def classification_report(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]
) -> dict[str, Any]:
    """Accuracy, per-class and macro precision / recall / F1, support and confusion matrix.

    Returns a dict with keys ``accuracy``, ``labels``, ``per_class`` (a list of dicts with ``label``,
    ``precision``, ``recall``, ``f1``, ``support``; ready for `markdown_table`), ``macro_precision``,
    ``macro_recall``, ``macro_f1``, ``support`` (number of examples) and ``confusion_matrix``
    (``cm[i][k]`` = number of examples of true label ``labels[i]`` predicted as ``labels[k]``).
    """
    y_true, y_pred, labels = list(y_true), list(y_pred), list(labels)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if not y_true:
        raise ValueError("classification_report needs at least one example")
    if not labels:
        raise ValueError("labels must not be empty")
    index = {lab: k for k, lab in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError("labels must be unique")
    for name, ys in (("y_true", y_true), ("y_pred", y_pred)):
        unknown = [y for y in ys if y not in index]
        if unknown:
            raise ValueError(f"{name} has labels not in `labels`: {sorted(set(map(repr, unknown)))}")

    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[index[t], index[p]] += 1
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)  # column sums: how often each label was predicted
    support = cm.sum(axis=1)  # row sums: how often each label is the truth

    per_class = []
    for k, lab in enumerate(labels):
        precision = _ratio(tp[k], predicted[k])
        recall = _ratio(tp[k], support[k])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class.append({"label": lab, "precision": precision, "recall": recall, "f1": f1,
                          "support": int(support[k])})
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "labels": labels,
        "per_class": per_class,
        "macro_precision": float(np.mean([c["precision"] for c in per_class])),
        "macro_recall": float(np.mean([c["recall"] for c in per_class])),
        "macro_f1": float(np.mean([c["f1"] for c in per_class])),
        "support": int(cm.sum()),
        "confusion_matrix": cm.tolist(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report tables
# ----------------------------------------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        return format(float(value), ".4g")  # 4 significant digits keeps tables narrow and comparable
    # A literal "|" would end the cell and newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of `rows` restricted to `columns` (missing values left empty).

    Floats are written with 4 significant digits; the result ends with a newline.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text (header + one line per row) of `rows` restricted to `columns`; full float precision."""
    if not columns:
        raise ValueError("csv_text needs at least one column")
    buf = io.StringIO()
    # extrasaction="ignore": rows may carry more keys than the report wants; restval: missing keys -> empty.
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()
