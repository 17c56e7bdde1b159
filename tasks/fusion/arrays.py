"""The data files a fusion reads (`--eval-data`, `--calibration`, `--finetune`): .npz files of a model's
inputs and, under `labels`, the labels. Plain numpy, so the CLI checks a file with the code the job and
every reproduce script read it with.
"""

from __future__ import annotations

import numpy as np

#: the .npz key that holds the labels; every other array is an input, in the order saved
LABELS_KEY = "labels"


def read_arrays(path: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(inputs, labels) of an .npz: the labels under `labels`, every other array an input, in the order saved
    (np.savez(f, a, b) names them arr_0, arr_1, kept in numeric order)."""
    with np.load(path, allow_pickle=False) as data:
        names = [n for n in data.files if n != LABELS_KEY]
        if names and all(n.startswith("arr_") and n[4:].isdigit() for n in names):
            names.sort(key=lambda n: int(n[4:]))
        inputs = [np.asarray(data[n]) for n in names]
        labels = np.asarray(data[LABELS_KEY]) if LABELS_KEY in data.files else None
    return inputs, labels


def arrays_problem(inputs: list[np.ndarray], labels: np.ndarray | None, need_labels: bool) -> str | None:
    """What makes the arrays unusable, or None: no inputs, missing labels, rows that do not line up."""
    if not inputs:
        return "holds no input arrays (every array but 'labels' is a model input, in forward order)"
    if need_labels and labels is None:
        return ("holds no 'labels' array: save the labels with the inputs, e.g. numpy.savez(path, x=inputs, "
                "labels=labels)")
    arrays = [*inputs, *([labels] if labels is not None else [])]
    if any(a.ndim == 0 for a in arrays):
        return "holds a scalar; every array needs a first (row) dim"
    rows = {int(a.shape[0]) for a in arrays}
    if len(rows) != 1:
        return f"has arrays with different numbers of rows ({sorted(rows)}); inputs and labels must line up"
    if rows == {0}:
        return "has no rows"
    return None
