"""What `optctl` prints to the terminal, and where everything else goes.

By default the terminal gets the platform's own lines (loggers `opt.*` and `flows.*` at INFO: a line per stage,
training progress with an ETA, warnings) and any library's errors. Everything, libraries included (Ray, Prefect,
MLflow, Alembic, uvicorn, transformers), goes to a log file `$OPT_HOME/logs/optctl-<utc>-<pid>.log`, named at the
end of the long commands. Ray's forwarded worker output and its C++ start-up banner go there too (`OPT_QUIET`,
read by the training driver). `-v` restores everything on the terminal, at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

OURS = ("opt", "flows")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_log_file: Path | None = None


class _Ours(logging.Filter):
    """The platform's records at INFO and above; other libraries' only from ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".", 1)[0] in OURS
        return record.levelno >= (logging.INFO if ours else logging.ERROR)


ENV_KEYS = ("MLFLOW_CONFIGURE_LOGGING", "PREFECT_LOGGING_SETTINGS_PATH", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "OPT_QUIET", "OPT_LOG_FILE")  # fmt: skip


@contextlib.contextmanager
def command(verbose: bool) -> Iterator[Path | None]:
    """`setup` for the duration of one command, then the process's logging and environment as they were
    (`main()` also runs inside test processes)."""
    global _log_file
    env = {k: os.environ.get(k) for k in ENV_KEYS}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield setup(verbose)
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _log_file = None


def setup(verbose: bool) -> Path | None:
    """Configure logging for one `optctl` command; returns the log file (None with `-v`, or if none can be made)."""
    global _log_file
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT)
        return None
    # libraries that set up their own handlers: let their records reach ours instead
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(Path(__file__).with_name("prefect_logging.yml")))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_Ours())
    root.addHandler(console)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's client logs every API call at INFO
    logs = Path(os.environ.get("OPT_HOME", ".opt")) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"optctl-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    except OSError:
        return None  # an unwritable home: the terminal still gets our lines
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    os.environ["OPT_QUIET"] = "1"
    os.environ["OPT_LOG_FILE"] = str(path.resolve())
    _log_file = path
    return path


def log_file() -> Path | None:
    """This command's log file, if it has anything in it."""
    return _log_file if _log_file is not None and _log_file.exists() and _log_file.stat().st_size else None


def quiet() -> bool:
    return os.environ.get("OPT_QUIET") == "1"


@contextlib.contextmanager
def stderr_to_log_file(on: bool) -> Iterator[None]:
    """File descriptor 2 appended to `$OPT_LOG_FILE` inside the block (what C++ code prints, Python's too)."""
    target = os.environ.get("OPT_LOG_FILE")
    if not on or not target:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
