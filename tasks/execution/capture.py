"""Keep library chatter (warnings, prints, torch logging) out of the terminal and in the job's `job.log`.

Exporters print graphs, tracers warn about every Python branch; that is useful when a step fails and
noise otherwise. Everything Python-level that the job's thread writes is captured; output written straight to
file descriptors by C++ code is not. Other threads keep the terminal: in the embedded default, a progress
display follows the batch from a thread of its own while the job runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

#: the job's log in its result folder: what its steps printed (and, for an isolated step, its crash stack)
LOG_FILE = "job.log"

_NOISY_LOGGERS = ("torch", "torch.onnx", "torch._dynamo", "torch._inductor", "torch.export", "onnxscript", "onnx_ir")


class _ThreadRouted(io.TextIOBase):
    """sys.stdout / sys.stderr while a job runs: what the job's thread writes goes to the job's log, what other
    threads write goes where it went before."""

    def __init__(self, original: TextIO, log: io.StringIO, owner: int) -> None:
        self.original, self.log, self.owner = original, log, owner

    def _target(self) -> Any:
        return self.log if threading.get_ident() == self.owner else self.original

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return threading.get_ident() != self.owner and self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8") or "utf-8"


@contextlib.contextmanager
def _routed(log: io.StringIO) -> Iterator[None]:
    owner = threading.get_ident()
    saved = sys.stdout, sys.stderr
    sys.stdout = _ThreadRouted(saved[0], log, owner)  # type: ignore[assignment]
    sys.stderr = _ThreadRouted(saved[1], log, owner)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


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
        with warnings.catch_warnings(record=True) as caught, _routed(buffer):
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
