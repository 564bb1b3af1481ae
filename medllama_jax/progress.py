"""Stages of long work: one console line when each starts, and what to name when one is cut short.

Library code announces what it is about to do with :func:`stage` (``with progress.stage("exporting
the final model"): ...``); the command-line layer (``medllama_jax.cli.console``) shows the line and,
when an error, Ctrl-C or SIGTERM ends the command, says during which stage it happened.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from absl import logging

# ``extra=`` of a record for the log file only: the console shows the same thing its own way.
FILE_ONLY = {"console": False}
# Set on an exception leaving a stage: the innermost stage it interrupted.
_STAGE_ATTRIBUTE = "_medllama_stage"


@contextlib.contextmanager
def stage(description: str) -> Iterator[None]:
  """Logs ``description`` (at INFO: one console line); an exception (or a signal raised as one)
  leaving the stage remembers it (:func:`interrupted_stage`)."""
  logging.info("%s", description)
  try:
    yield
  except BaseException as error:
    if not hasattr(error, _STAGE_ATTRIBUTE):
      setattr(error, _STAGE_ATTRIBUTE, description)
    raise


def interrupted_stage(error: BaseException) -> str | None:
  """The innermost stage ``error`` left, or None if it was raised outside every stage."""
  return getattr(error, _STAGE_ATTRIBUTE, None)


def format_duration(seconds: float) -> str:
  """``75`` → ``"1m15s"``, ``3725`` → ``"1h02m"``: short enough for a progress line."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Bar:
  """Progress of countable work (tensors, shards) as one console line.

  On a terminal the line is redrawn in place; elsewhere (a log file, CI) a line is logged at each
  tenth of the work at most every ``LOG_INTERVAL_S`` seconds, so a conversion of hundreds of tensors
  prints at most ten lines and a quick one only its end. The last state is always logged.
  """

  LOG_INTERVAL_S = 10.0

  def __init__(self, description: str, total: int, unit: str):
    self._description, self._total, self._unit = description, max(total, 1), unit
    self._done = 0
    self._started = time.perf_counter()
    self._logged_tenths = 0
    self._logged_at = self._started
    self._terminal = _is_terminal(sys.stderr)

  def update(self, count: int = 1) -> None:
    self._done = min(self._done + count, self._total)
    finished = self._done == self._total
    if self._terminal:
      sys.stderr.write(f"\r{self._line()}{chr(10) if finished else ''}")
      sys.stderr.flush()
      if finished:
        logging.info("%s", self._line(), extra=FILE_ONLY)
      return
    tenths = self._done * 10 // self._total
    now = time.perf_counter()
    if finished or (tenths > self._logged_tenths and now - self._logged_at >= self.LOG_INTERVAL_S):
      self._logged_tenths, self._logged_at = tenths, now
      logging.info("%s", self._line())

  def _line(self) -> str:
    elapsed = time.perf_counter() - self._started
    fraction = self._done / self._total if self._total else 1.0
    filled = int(fraction * _BAR_WIDTH)
    eta = elapsed / fraction - elapsed if fraction else 0.0
    when = (f"{format_duration(elapsed)}" if self._done == self._total
            else f"ETA {format_duration(eta)}")
    return (f"{self._description}: [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
            f"{self._done}/{self._total} {self._unit} {100 * fraction:.0f}% {when}")


_BAR_WIDTH = 30


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False
