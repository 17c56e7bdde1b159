"""Keep library chatter (warnings, prints, torch logging) out of the terminal and in the job's `job.log`.

Exporters print graphs, tracers warn about every Python branch; that is useful when a step fails and
noise otherwise. Everything Python-level is captured; output written straight to file descriptors by
C++ code is not.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

_NOISY_LOGGERS = ("torch", "torch.onnx", "torch._dynamo", "torch._inductor", "torch.export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def captured(log_path: Path) -> Iterator[None]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved: list[tuple[logging.Logger, int, bool]] = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buffer), \
                contextlib.redirect_stderr(buffer):
            warnings.simplefilter("always")
            yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        seen: set[str] = set()
        lines = []
        for w in caught:
            text = f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
            if text not in seen:
                seen.add(text)
                lines.append(text)
        log = buffer.getvalue() + ("\n".join(lines) + "\n" if lines else "")
        if log.strip():
            with open(log_path, "a") as f:
                f.write(log)
