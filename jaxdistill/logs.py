"""Where log lines go: our warnings and progress on the console, library chatter in a log file.

absl, orbax, tfds, grain and jax log through Python's `logging` (orbax's "read only" notices,
tfds' "Downloading and preparing dataset Unknown size"), and tfds prints its own progress bars.
On the console a user wants the command's progress and result, and the warnings of jaxdistill
itself (its loggers' records and the Python warnings raised in its code). `console()` (installed once by `cli.main`) shows on stderr only records of the
`jaxdistill` loggers at WARNING and above, and anyone's ERROR and above; every record at INFO
and above goes to the log file of the moment, opened by `to_file(path)`: `RUN_DIR/log.txt` for
a run (train.run opens it; eval, predict and export append to it) and `OUT.log` beside the
output of `data prepare` and `cache-teacher`. `to_file(..., capture_output=True)` also sends
what libraries print to stdout/stderr there (tfds' bars); the command's result is written to
the real stdout by the CLI, so it still shows. Python warnings are logged: ours show, a
library's go to the file (`py.warnings`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

OURS = "jaxdistill"
RUN_LOG = "log.txt"  # in a run directory
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _ConsoleFilter(logging.Filter):
    """Our warnings, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        return record.levelno >= (logging.WARNING if ours else logging.ERROR)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as log records: ours (a category of ours, or raised in our code) under
    `jaxdistill.warnings`, so they show; a library's under `py.warnings`, for the file."""
    ours = category.__module__.split(".")[0] == OURS or os.path.abspath(filename).startswith(
        PACKAGE_DIR + os.sep)
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    if ours:
        logging.getLogger(f"{OURS}.warnings").warning("%s", f"{category.__name__}: {message}")
    else:
        logging.getLogger("py.warnings").warning("%s", text)


@contextlib.contextmanager
def console(stream=None) -> Iterator[logging.Handler]:
    """Our warnings and anyone's errors on `stream` (default: stderr), nothing else; Python
    warnings become log records. Restores the logging set-up it found on exit."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_ConsoleFilter())
    saved_level, saved_handlers = root.level, list(root.handlers)
    absl_handler = _absl_handler()
    if absl_handler is not None and absl_handler in root.handlers:
        root.removeHandler(absl_handler)  # absl's handler would print everything to stderr
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    saved_showwarning, warnings.showwarning = warnings.showwarning, _log_warning
    try:
        yield handler
    finally:
        warnings.showwarning = saved_showwarning
        root.removeHandler(handler)
        root.setLevel(saved_level)
        for h in saved_handlers:
            if h not in root.handlers:
                root.addHandler(h)


@contextlib.contextmanager
def to_file(path: str | os.PathLike, *, capture_output: bool = False) -> Iterator[Path]:
    """Every log record (INFO and above) appended to `path` while inside; with
    `capture_output`, what is printed to stdout/stderr too (libraries' progress bars)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    saved_level = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        with contextlib.ExitStack() as stack:
            if capture_output:
                stream = stack.enter_context(open(path, "a", encoding="utf-8", buffering=1))
                stack.enter_context(contextlib.redirect_stdout(stream))
                stack.enter_context(contextlib.redirect_stderr(stream))
            yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved_level)


def beside(out: str | os.PathLike) -> Path:
    """The log file of a command writing `out`: `OUT.log` next to it."""
    out = Path(out)
    return out.with_name(out.name + ".log")


def _absl_handler():
    absl_logging = sys.modules.get("absl.logging")
    return getattr(absl_logging, "_absl_handler", None) if absl_logging else None
