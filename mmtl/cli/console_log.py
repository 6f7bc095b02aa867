"""What a command prints, and where the rest goes.

A healthy ``mmtl run`` should show mmtl's own lines (settings, progress with ETA, the results table, where
things are), not the chatter of the libraries underneath. :class:`ConsoleLog` wraps this process's
``sys.stdout`` / ``sys.stderr`` for one command:

* every line (ANSI colours stripped) goes to a log file once the command knows where (``mmtl run``:
  ``<run_dir>/console.log``, also logged to the MLflow run); lines before that are buffered;
* the terminal gets every line except the known noise below, unless ``verbose`` (``mmtl -v ...``,
  ``mmtl run -v``, or ``MMTL_VERBOSE=1``), which shows the full stream unchanged;
* progress lines the Ray Train workers print (``(RayTrainWorker pid=...) [mmtl] step ...``) are shown as
  ``mmtl step ...``.

The noise (:data:`NOISE`): each entry is a message that is not about the user's run, with why it is there.
Real warnings and errors, tracebacks and anything not listed pass through. Output written by C/C++ code
straight to the file descriptors (not through Python) bypasses this; Ray keeps its own logs under
``/tmp/ray/session_latest/logs``.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Optional, TextIO

#: (regex, reason) of lines hidden from the terminal (still in the log file)
NOISE: tuple[tuple[str, str], ...] = (
    (r"Failed to query Ray Train Controller actor state",
     "Ray Train's placement-group cleaner polls the State API, which needs the dashboard mmtl does not start"),
    (r"^(?:\x1b\[[0-9;]*m)?\(PlacementGroupCleaner pid=\d+(?:, ip=[0-9.]+)?\)",
     "anything else that actor prints, e.g. its monitor thread's traceback when several local Ray instances run "
     "(its State-API lookup cannot pick one); the run does not depend on it"),
    (r"'PreemptionWatcher' .* constructor arguments in the object store",
     "Ray Train internal actor, a notice for Ray developers"),
    (r"Setting accelerator to CPU",
     "DeepSpeed on a machine without GPUs, once per process; mmtl prints the device it trains on"),
    (r"Token authentication is enabled for this Ray cluster",
     "Ray's token-auth notice for a local instance on 127.0.0.1"),
    (r"Reporting training result \d+: TrainingReport\(",
     "Ray Train's repr of every checkpoint report; mmtl prints the step lines"),
    (r"Progress bars disabled\. To enable",
     "Ray Data, where mmtl turns its progress bars off on purpose"),
    (r"Dataset \S+ execution finished in [0-9.]+ seconds",
     "Ray Data's per-dataset completion line inside the training loop; mmtl prints the step lines"),
    (r"mlflow\.store\.db\.utils: (Creating initial MLflow database tables|Updating database tables)",
     "MLflow creating its local sqlite store"),
    (r"Registered model '.*' already exists\. Creating a new version",
     "MLflow, when registering the next version; mmtl prints the version"),
    (r"^\s*(Successfully registered model|Created version) '",
     "MLflow registry; mmtl prints the registered name and version"),
)
_NOISE_RE = re.compile("|".join(f"(?:{p})" for p, _ in NOISE))
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WORKER_MMTL_RE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\([A-Za-z_]+ pid=\d+(?:, ip=[0-9.]+)?\)(?:\x1b\[0m)? \[mmtl\] ")


def is_noise(line: str) -> bool:
    """True when ``line`` is one of :data:`NOISE` (hidden from the terminal unless verbose)."""
    return bool(_NOISE_RE.search(line))


def for_terminal(line: str) -> Optional[str]:
    """``line`` as the quiet terminal shows it: None for noise, ``mmtl ...`` for a worker's ``[mmtl]`` line."""
    if is_noise(line):
        return None
    return _WORKER_MMTL_RE.sub("mmtl ", line)


def verbose_from_env() -> bool:
    """``MMTL_VERBOSE`` set to 1/true/yes."""
    return os.environ.get("MMTL_VERBOSE", "").strip().lower() in ("1", "true", "yes")


class _Tee(io.TextIOBase):
    """A text stream: whole lines to the log sink, filtered lines to the wrapped terminal stream."""

    def __init__(self, term: TextIO, log: "ConsoleLog") -> None:
        self._term, self._log, self._pending = term, log, ""

    def write(self, s: str) -> int:
        with self._log.lock:
            self._pending += s
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                self._emit(line + "\n")
            if "\r" in self._pending:  # a progress bar redrawing in place: show it now (not kept in the log)
                if self._log.verbose or not is_noise(self._pending):
                    self._term.write(self._pending)
                    self._term.flush()
                self._pending = ""
        return len(s)

    def _emit(self, line: str) -> None:
        self._log.record(line)
        shown = line if self._log.verbose else for_terminal(line)
        if shown is not None:
            self._term.write(shown)

    def flush(self) -> None:
        with self._log.lock:
            self._term.flush()

    # what rich / tqdm / logging ask a stream
    def isatty(self) -> bool:
        try:
            return self._term.isatty()
        except ValueError:  # the terminal stream was closed (e.g. colorama's atexit after a test's CliRunner)
            return False

    def fileno(self) -> int:
        return self._term.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._term, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


class ConsoleLog:
    """Filter and keep this process's console output for one command (module docstring).

    Use as a context manager; call :meth:`attach` once the log file's place is known.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose or verbose_from_env()
        self.lock = threading.RLock()
        self._buffer: list[str] = []
        self._file: Optional[TextIO] = None
        self.path: Optional[Path] = None
        self._saved: tuple[TextIO, TextIO] | None = None
        self._levels: dict[str, int] = {}
        self._closed = False

    def record(self, text: str) -> None:
        """Append ``text`` (ANSI colours stripped) to the log file, or the buffer before :meth:`attach`."""
        if not text or self._closed:
            return
        text = _ANSI_RE.sub("", text)
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        else:
            self._buffer.append(text)

    def attach(self, path: Path) -> None:
        """Write the log to ``path`` from now on (appending: a resumed run keeps its earlier log), starting with
        everything buffered so far."""
        with self.lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self._file is not None:
                self._file.close()
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
            self.path = path
            buffered, self._buffer = "".join(self._buffer), []
            self._file.write(buffered)
            self._file.flush()

    def close_file(self) -> None:
        """Close the log file; later lines are no longer kept (the terminal filter goes on)."""
        with self.lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._closed = True

    def __enter__(self) -> "ConsoleLog":
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        if not self.verbose:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            for name, level in (("mlflow.store.db.utils", logging.WARNING), ("alembic", logging.WARNING)):
                lg = logging.getLogger(name)
                self._levels[name] = lg.level
                lg.setLevel(level)
        return self

    def __exit__(self, *exc) -> None:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Tee) and stream._pending:
                stream.write("\n")
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        with self.lock:
            if self._file is not None:
                self._file.close()
                self._file = None


_ACTIVE: Optional[ConsoleLog] = None


def start(verbose: bool = False) -> ConsoleLog:
    """Enter a :class:`ConsoleLog` for this command (the CLI's callback calls it once) and make it :func:`active`."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.verbose = _ACTIVE.verbose or verbose
        return _ACTIVE
    _ACTIVE = ConsoleLog(verbose).__enter__()
    return _ACTIVE


def stop() -> None:
    """End the active :class:`ConsoleLog`'s log file. The terminal filter stays until the process exits: Ray
    flushes its deduplicated worker lines at interpreter exit, after the command returns."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close_file()
        _ACTIVE = None


def active() -> Optional[ConsoleLog]:
    """The :class:`ConsoleLog` of the running command, if any."""
    return _ACTIVE
