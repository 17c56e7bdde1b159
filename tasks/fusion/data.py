"""A fusion's data files (`--eval-data`, `--calibration`, `--finetune`), read and checked: the client checks
each before uploading anything (a `ConfigError`, exit 2), the job again when it starts (an `InputError`).
The reading itself is `portq.tasks.fusion.arrays`, which reproduce scripts share.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from portq.tasks.core.errors import ConfigError, InputError, first_line
from portq.tasks.fusion import arrays


def read_data(path: Path, display: str, flag: str, need_labels: bool, error: type[InputError] | type[ConfigError],
              step: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The arrays of a fusion's data file, or `error` saying what is wrong with it (the client refuses with
    ConfigError before uploading; the job with InputError)."""
    try:
        inputs, labels = arrays.read_arrays(str(path))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise error(f"{flag}: cannot read the arrays: {first_line(e)}", step=step, file=display,
                    hint="write it with numpy.savez(path, x=inputs, labels=labels)") from None
    problem = arrays.arrays_problem(inputs, labels, need_labels)
    if problem:
        raise error(f"{flag}: {problem}", step=step, file=display)
    return inputs, labels
