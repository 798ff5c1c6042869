"""What reaches the console: progress bars on stderr, and Ray's own log lines kept to its warnings unless ``verbose``.

Ray prints, through the driver, every line its processes log: its INFO lines ("Started a local Ray instance",
"Requesting resources", "Setting up process group") and its backend's C++ lines (``[... E 26550 26592]
core_worker.cc:2465: ...``). A run quiets them with Ray's own, documented knobs, each at its source:

* the driver's ``ray`` logger: ``ray.init(logging_level=...)`` (:func:`ray_log_level`, where lepton_ray starts or
  joins Ray);
* Ray Train's controller and workers: ``RunConfig(logging_config=ray.train.LoggingConfig(log_level=...))``;
* the C++ lines other processes write to their stderr: ``RAY_DEDUP_LOGS_SKIP_REGEX`` (:data:`CPP_LOG_LINE`), which
  Ray reads once, when it is imported (so the CLI sets it first: :func:`quiet_ray_env`). They stay in Ray's log
  files (``/tmp/ray/session_latest/logs``).

Python lines at WARNING and above, a worker's exception, and anything a worker prints still reach the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any, Iterator, Optional

__all__ = ["CPP_LOG_LINE", "environ", "progress_bar", "quiet_ray_env", "ray_log_level", "say"]

CPP_LOG_LINE = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] "
"""A Ray backend (C++) log line below FATAL, as a Ray process's stderr carries it to the driver:
``[2026-12-07 03:28:23,885 E 26550 26592] core_worker.cc:2465: Actor with class name: ...``."""


def ray_log_level(verbose: bool) -> int:
    """The level of Ray's Python loggers: INFO (Ray's default) when ``verbose``, else WARNING."""
    return logging.INFO if verbose else logging.WARNING


def quiet_ray_env(verbose: bool, environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment variables that quiet Ray's C++ lines in the console (none when ``verbose``, or where the user
    set the variable already), set in ``environ`` (default ``os.environ``): before Ray is imported, or they do nothing.

    >>> env = {}
    >>> quiet_ray_env(False, env) == env == {"RAY_DEDUP_LOGS_SKIP_REGEX": CPP_LOG_LINE}
    True
    >>> quiet_ray_env(True, {}), quiet_ray_env(False, {"RAY_DEDUP_LOGS_SKIP_REGEX": "mine"})
    ({}, {})
    """
    environ = os.environ if environ is None else environ
    ours = {} if verbose or "RAY_DEDUP_LOGS_SKIP_REGEX" in environ else {"RAY_DEDUP_LOGS_SKIP_REGEX": CPP_LOG_LINE}
    environ.update(ours)
    return ours


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block inside, each where the user has not set it; removed after.

    >>> with environ({"LEPTON_RAY_DOCTEST": "1"}):
    ...     os.environ["LEPTON_RAY_DOCTEST"]
    '1'
    >>> "LEPTON_RAY_DOCTEST" in os.environ
    False
    """
    ours = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)


def is_cpp_line(line: str) -> bool:
    """``line`` (as a Ray process logged it, before the driver's ``(name pid=...)`` prefix) is what
    :data:`CPP_LOG_LINE` keeps off the console.

    >>> is_cpp_line("[2026-12-07 03:28:23,885 E 31924 32085] core_worker.cc:2465: Actor with class name: 'X'")
    True
    >>> is_cpp_line("[2026-12-07 03:28:23,885 F 31924 32085] raylet.cc:1: the raylet died"), is_cpp_line("Requesting resources")
    (False, False)
    """
    return re.search(CPP_LOG_LINE, line) is not None


def progress_bar(total: Optional[float], desc: str, unit: str, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr: redrawn live on a terminal; in a log file (``ray job logs``, CI), where every redraw is a
    new line, at most every 10 s, always on the bar's own line (no cursor moves to stack it under bars another
    caller left open). ``enabled=False``: a bar that prints nothing (its counts still work)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=tty, mininterval=0.1 if tty else 10.0,
                ascii=not tty, disable=not enabled, **({} if tty else {"position": 0}), **kwargs)


def say(message: str, file: Any = None) -> None:
    """``message`` on ``file`` (default stderr), above any progress bar (tqdm keeps the bar below it)."""
    from tqdm.auto import tqdm

    file = file or sys.stderr
    tqdm.write(message, file=file)
    file.flush()
