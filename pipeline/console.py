"""What a command prints on stderr: our own lines by default, Ray's too with -v.

By default a user sees our log lines (`hqsam: ...`), progress, warnings that need their action and
the summary. Ray's full logs stay on disk, in the Ray session's log folder, whose path is printed
when a run fails (`ray_log_dir`). What keeps Ray quiet (`quiet_ray`, called once Ray runs):

- Ray's Python loggers print warnings and errors only, less the advice that a command's user cannot
  act on (`ADVICE_FOR_CODE_AUTHORS`); their file handlers still get everything;
- Ray's native (C++) log lines reach stderr through a filter process that drops only the lines of
  `HARMLESS_NATIVE_LINES` and passes every other line on, also if this process crashes.

Without `configure` (hqsam used as a library) nothing here changes Ray's or Python's logging.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable

# Ray Data always puts an actor's constructor arguments (the UDF and its DataContext) in the object
# store; it holds them for the operator's lifetime, so the restart this warns about cannot fail.
HARMLESS_NATIVE_LINES = r"has constructor arguments in the object store and max_restarts > 0"

ADVICE_FOR_CODE_AUTHORS = (
    "Progress bars disabled",  # ours replace them
    "Progress bars for operators disabled",
    "in the appropriate function or method call",  # memory= advice: the refine actor's is ours to size
    "To disable issue detection",
    "Progress will be logged because stdout is a non-interactive terminal",
)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")

_state: dict = {"configured": False, "verbose": False, "filter": None}


class _HqsamFormatter(logging.Formatter):
    """`hqsam: message`, `hqsam: warning: message`, `hqsam: error: message`."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"hqsam: {level}{super().format(record)}"


class _NoAdvice(logging.Filter):
    """Drops Ray's records that only advise the author of the calling code."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = " ".join(record.getMessage().split())  # Ray wraps some messages over lines
        return not any(advice in message for advice in ADVICE_FOR_CODE_AUTHORS)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _PlainText(logging.Formatter):
    """Another formatter's text, its ANSI escape codes (Ray colours task names) removed unless
    stderr is a terminal."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        isatty = getattr(sys.stderr, "isatty", None)
        return text if isatty and isatty() else ANSI_ESCAPE.sub("", text)


def configure(verbose: bool = False) -> None:
    """Set up the command line's stderr: our logger's lines, and Ray's only with `verbose`."""
    _state["configured"], _state["verbose"] = True, verbose
    if not sys.stderr.isatty():  # Ray colours its workers' log prefixes unless told not to
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    ours = logging.getLogger("hqsam")
    if not any(isinstance(h.formatter, _HqsamFormatter) for h in ours.handlers):
        handler = logging.StreamHandler()  # sys.stderr when each line is written
        handler.setFormatter(_HqsamFormatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False


def verbose() -> bool:
    """Whether Ray's logs are to be shown (-v); True for library use, where we leave Ray alone."""
    return _state["verbose"] or not _state["configured"]


def before_ray_starts() -> None:
    """Called just before ray.init: the native log filter, for a quiet command line."""
    if not verbose() and _state["filter"] is None:
        _state["filter"] = _filter_native_stderr(HARMLESS_NATIVE_LINES)


def quiet_ray() -> None:
    """Ray's Python loggers on the command line: no ANSI colours unless stderr is a terminal;
    without -v, warnings and errors only, less advice for code authors, and no Ray Data execution
    banner. Nothing changes for library use."""
    if not _state["configured"]:
        return
    import ray.data

    quiet = not _state["verbose"]
    if quiet:
        ray.data.DataContext.get_current().print_on_execution_start = False
        logging.getLogger("ray").setLevel(logging.WARNING)  # its records reach Python's last resort
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.FileHandler) or type(handler).__name__.endswith("FileHandler"):
                continue  # the full logs stay on disk
            if not isinstance(handler.formatter, _PlainText):
                handler.setFormatter(_PlainText(handler.formatter))
            if quiet:
                handler.setLevel(max(handler.level, logging.WARNING))
                if not any(isinstance(f, _NoAdvice) for f in handler.filters):
                    handler.addFilter(_NoAdvice())


def ray_log_dir() -> str | None:
    """The log folder of the Ray session this process started or joined, if any."""
    if "ray" not in sys.modules:
        return None
    try:
        import ray

        if not ray.is_initialized():
            return None
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # private Ray API, best effort: a missing path must not mask the failure
        return None


def _writes_to_fd(stream: object, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


_FILTER_CODE = """
import re, sys
harmless = re.compile(sys.argv[1].encode())
for line in sys.stdin.buffer:
    if not harmless.search(line):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


def _filter_native_stderr(harmless: str) -> Callable[[], None]:
    """Route file descriptor 2 (where Ray's C++ code logs) through a filter process that drops
    the lines matching `harmless`; Python's sys.stderr keeps writing to the real stderr, unfiltered
    and unbuffered by the filter (progress lines redrawn in place). The filter is a process, not a
    thread, so that the lines a crash of this process writes last still come out."""
    real = os.dup(2)
    process = subprocess.Popen(
        [sys.executable, "-c", _FILTER_CODE, harmless], stdin=subprocess.PIPE, stdout=real, close_fds=True
    )
    python_stderr = sys.stderr
    python_stderr.flush()
    os.dup2(process.stdin.fileno(), 2)
    if _writes_to_fd(python_stderr, 2):
        encoding = python_stderr.encoding
        sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, encoding=encoding, errors="replace")
    # else stderr is captured (a test's runner, a notebook): left alone, as dropping the last
    # reference to a capturing stream closes it under its owner

    def restore() -> None:  # before Ray's own exit handler (atexit runs last registered first)
        sys.stderr.flush()
        os.dup2(real, 2)
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a child of Ray still holds the pipe: it drains on its own
            pass

    atexit.register(restore)
    return restore
