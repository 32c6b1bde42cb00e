"""Progress of long loops, shown the way the place the code runs in can show it.

On a terminal (stderr is a TTY) `ProgressBar` is a tqdm bar. Without one, as under a Prefect worker, whose stderr
goes into the flow-run log, there is no bar: a log line every LOG_EVERY_PERCENT percent (on Prefect's run logger
inside a flow or task run, this module's logger elsewhere) carries the count, the postfix values and the time left,
and inside a flow or task run a Prefect progress artifact, updated at the same points, shows the percentage.

The interface is the part of tqdm's the task code uses:

    with ProgressBar(total=len(pending), desc="tokens", unit="image", disable=not progress) as bar:
        bar.update(len(batch))
        bar.set_postfix(loss=f"{loss:.3f}")

or `bar = ProgressBar(...)` ... `bar.close()`, or `for item in ProgressBar(items, ...)`. `description` names the
work in log lines and artifacts (default: desc). A bar with `leave=False` is a transient one, nested in another
(an epoch inside a training run): on a terminal it is a tqdm bar that vanishes when done, without a TTY it says
nothing, as the bar around it reports. A bar without a total logs every UNKNOWN_TOTAL_LOG_SECONDS instead.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from numbers import Number
from typing import Any, Generic, TypeVar

from tqdm import tqdm

LOG_EVERY_PERCENT = 10
UNKNOWN_TOTAL_LOG_SECONDS = 60.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def _on_terminal(stream: Any) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class ProgressBar(Generic[T]):
    """A tqdm bar on a terminal; sparse log lines and a Prefect progress artifact elsewhere (see the module doc)."""

    def __init__(self, iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str | None = None,
                 unit: str = "it", initial: float = 0, disable: bool = False, leave: bool = True,
                 description: str | None = None, **tqdm_kwargs: Any):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.unit = iterable, total, initial, unit
        self.description = description or desc or "progress"
        self._tqdm: tqdm | None = None
        self._logging = False
        self._closed = False
        if disable:
            return
        if _on_terminal(tqdm_kwargs.get("file", sys.stderr)):
            self._tqdm = tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                              **tqdm_kwargs)
            return
        if not leave or total == 0:
            return
        self._logging = True
        self._unit_scale = bool(tqdm_kwargs.get("unit_scale"))
        self._postfix: dict[str, Any] = {}
        self._start_n, self._start_time = initial, time.monotonic()
        self._reported_n: float | None = None
        self._reported_time = self._start_time
        self._step = self._current_step() if total is not None else 0
        self._logger = _run_logger()
        self._artifact_id = None
        self._artifacts = total is not None and _in_prefect_run()
        self._report()

    def __enter__(self) -> ProgressBar[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        if self._tqdm is not None:
            yield from self._tqdm
            return
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: float = 1) -> None:
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        self.n += n
        if not self._logging or self._closed:
            return
        if self.total is None:
            if time.monotonic() - self._reported_time >= UNKNOWN_TOTAL_LOG_SECONDS:
                self._report()
        elif (step := self._current_step()) > self._step:
            self._step = step
            self._report()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        if self._tqdm is not None:
            self._tqdm.set_postfix(ordered_dict, refresh=refresh, **kwargs)
        elif self._logging:
            self._postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._logging and self.n != self._reported_n:  # stopped between two points, or no total
            self._report()

    def _current_step(self) -> int:
        return int(min(self.n, self.total) * 100 // self.total) // LOG_EVERY_PERCENT

    def _count(self, n: float) -> str:
        if self._unit_scale:
            return tqdm.format_sizeof(n)
        return str(int(n)) if float(n).is_integer() else f"{n:.4g}"

    def _report(self) -> None:
        now = time.monotonic()
        elapsed = now - self._start_time
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        postfix = ", ".join(f"{key}={tqdm.format_num(value) if isinstance(value, Number) else value}"
                            for key, value in self._postfix.items())
        if self.total is None:
            line = f"{self.description}: {self._count(self.n)} {self.unit}"
            timing = f"{tqdm.format_interval(elapsed)} elapsed, {self._count(rate)} {self.unit}/s"
        else:
            percent = 100 * min(self.n, self.total) / self.total
            line = f"{self.description}: {math.floor(percent)}% ({self._count(self.n)}/{self._count(self.total)} " \
                   f"{self.unit})"
            left = (self.total - self.n) / rate if rate > 0 else None
            timing = f"{tqdm.format_interval(elapsed)} elapsed" + (
                f", {tqdm.format_interval(left)} left" if left is not None and left > 0 else "")
            self._update_artifact(percent)
        self._logger.info("%s%s [%s]", line, f" {postfix}" if postfix else "", timing)
        self._reported_n, self._reported_time = self.n, now

    def _update_artifact(self, percent: float) -> None:
        if not self._artifacts:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        description = f"{self.description}: {self._count(self.n)}/{self._count(self.total)} {self.unit}"
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(percent, description=description, _sync=True)
            else:
                update_progress_artifact(self._artifact_id, percent, description=description, _sync=True)
        except Exception as error:  # progress reporting must never stop the work it reports on
            self._artifacts = False
            self._logger.warning("%s: no progress artifact (%s: %s)", self.description, type(error).__name__, error)
