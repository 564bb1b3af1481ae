"""What a person sees while a command runs, and what its log file keeps.

* The log file (``--log_dir``; default ``$MEDLLAMA_LOG_DIR``, else ``medllama-jax-logs`` in the
  system's temporary folder) gets everything: every library's records at INFO and above, Python
  warnings, and whatever reaches the process's stderr (the C++ start-up messages of TensorFlow, XLA
  and libtpu).
* The console gets the project's own records: one line per stage (``medllama_jax.progress``), the
  live progress of long work, warnings. A failure ends the command with one line, ``PROG: error:
  ...``, that names the log file holding the traceback; exit status 2 for a usage mistake, 1 for a
  failure, 130 for Ctrl-C, 143 for SIGTERM (each saying what was interrupted).
* ``--debug`` leaves stderr alone, shows every library's records and raises errors with their
  traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging as py_logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn, TextIO

from absl import flags, logging

from medllama_jax import progress

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
LOG_DIR_ENV = "MEDLLAMA_LOG_DIR"

# Records from files under these folders are the project's own; the rest is library chatter.
_OWN_CODE = tuple(f"{os.sep}{name}{os.sep}"
                  for name in ("medllama_jax", "seqio_tasks", "scripts", "benchmarks"))


class UsageError(Exception):
  """A command-line mistake found after the arguments were parsed (exit status 2)."""


class Terminated(BaseException):
  """SIGTERM arrived where no stage handles it (start-up, export): the command stops cleanly.

  A BaseException, like KeyboardInterrupt, so that ``except Exception`` blocks do not swallow it."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a one-line error (``PROG: error: ...; see PROG --help``) instead of the usage text."""

  def error(self, message: str) -> NoReturn:
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser(prog: str, description: str | None) -> ArgumentParser:
  """The parser of a command, with ``--debug`` and ``--log_dir``."""
  parser = ArgumentParser(prog=prog, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_console_flags(parser)
  return parser


def add_console_flags(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
  """``--debug`` and ``--log_dir``; a ``subcommand``'s copies set them only when given, so they
  may come before or after the subcommand's name."""
  defaults = {"default": argparse.SUPPRESS} if subcommand else {}
  parser.add_argument("--debug", action="store_true",
                      help="show every library's log records and the traceback of an error",
                      **defaults)
  parser.add_argument("--log_dir", help=f"folder of the log file (default: ${LOG_DIR_ENV}, else "
                                        f"{default_log_dir()})", **defaults)


def add_skip_checksums_flag(parser: argparse.ArgumentParser) -> None:
  """``--skip_checksums``, for commands that read model folders."""
  parser.add_argument("--skip_checksums", action="store_true",
                      help="do not check the parameters against the checksums recorded with them "
                           "(faster loading; corrupted files then go unnoticed)")


def default_log_dir() -> str:
  return os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "medllama-jax-logs")


def log_file_path(prog: str, log_dir: str | None) -> str:
  """``LOG_DIR/PROG.YYYYmmdd-HHMMSS.PID.log``: one file per command and process."""
  directory = os.path.abspath(log_dir or default_log_dir())
  os.makedirs(directory, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join(directory, f"{prog}.{stamp}.{os.getpid()}.log")


class _ProjectRecords(py_logging.Filter):
  """Keeps the project's own records (libraries' go to the log file only)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return any(part in record.pathname for part in _OWN_CODE)


class _NotFileOnly(py_logging.Filter):
  """Leaves out the records logged with ``extra=progress.FILE_ONLY``."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return getattr(record, "console", True)


class _ConsoleFormatter(py_logging.Formatter):
  """The message alone; warnings and errors say so."""

  def format(self, record: py_logging.LogRecord) -> str:
    message = record.getMessage()
    if record.levelno >= py_logging.ERROR:
      return f"error: {message}"
    if record.levelno >= py_logging.WARNING:
      return f"warning: {message}"
    return message


def console_handler(stream: TextIO, debug: bool = False) -> py_logging.Handler:
  """The project's records (every library's with ``debug``) as plain lines on ``stream``."""
  handler = py_logging.StreamHandler(stream)
  handler.setFormatter(_ConsoleFormatter())
  handler.addFilter(_NotFileOnly())
  if not debug:
    handler.addFilter(_ProjectRecords())
  return handler


def show_project_records_on_stderr() -> None:
  """For scripts that print their own results (benchmarks): the project's records on stderr, as
  commands show them, without a log file."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  py_logging.getLogger().addHandler(console_handler(sys.stderr))
  py_logging.getLogger().setLevel(py_logging.INFO)
  logging.set_verbosity(logging.INFO)


def _is_process_stderr(stream: TextIO) -> bool:
  try:
    return stream.fileno() == 2
  except (AttributeError, OSError, ValueError):
    return False


@contextlib.contextmanager
def _logging_to(log_path: str, debug: bool) -> Iterator[TextIO]:
  """Routes records and stderr as the module docstring says, for the duration of a command; yields
  the console stream."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl would warn that logging precedes flag parsing.
  log_file = open(log_path, "a", buffering=1, encoding="utf-8")
  saved_stderr, saved_fd = sys.stderr, None
  console: TextIO = saved_stderr
  if not debug and _is_process_stderr(saved_stderr):
    saved_stderr.flush()
    saved_fd = os.dup(2)
    console = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log_file.fileno(), 2)
    sys.stderr = console
  root = py_logging.getLogger()
  file_handler = py_logging.StreamHandler(log_file)
  file_handler.setFormatter(logging.PythonFormatter())
  project_handler = console_handler(console, debug)
  removed = [h for h in root.handlers if isinstance(h, logging.ABSLHandler)]
  for handler in removed:
    root.removeHandler(handler)
  root.addHandler(file_handler)
  root.addHandler(project_handler)
  previous_level = root.level
  root.setLevel(py_logging.INFO)
  logging.set_verbosity(logging.INFO)
  py_logging.captureWarnings(True)
  try:
    yield console
  finally:
    py_logging.captureWarnings(False)
    root.removeHandler(file_handler)
    root.removeHandler(project_handler)
    for handler in removed:
      root.addHandler(handler)
    root.setLevel(previous_level)
    if saved_fd is not None:
      sys.stderr = saved_stderr
      os.dup2(saved_fd, 2)
      os.close(saved_fd)
      console.close()
    log_file.close()


def _during(error: BaseException) -> str:
  stage = progress.interrupted_stage(error)
  return f" during: {stage}" if stage else ""


def _raise_terminated(signum: int, frame) -> None:
  raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  """SIGTERM raises :class:`Terminated` (stages that handle it, like the training loop, install
  their own handler meanwhile)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def run(prog: str, args: argparse.Namespace, body: Callable[[], int | None],
        show_log_path: bool = False) -> int:
  """Runs ``body`` (a command's work, after its arguments were parsed) as the module docstring
  says; returns the exit status. ``show_log_path``: name the log file first (long commands)."""
  log_path = log_file_path(prog, args.log_dir)
  with _logging_to(log_path, args.debug) as console, _sigterm_raises():
    def fail(status: int, message: str) -> int:
      print(f"{prog}: {message}", file=console)
      return status

    if show_log_path:
      print(f"{prog}: log file {log_path}", file=console)
    try:
      return body() or 0
    except UsageError as e:
      logging.info("usage error: %s", e, extra=progress.FILE_ONLY)
      return fail(EXIT_USAGE, f"error: {e} (see {prog} --help)")
    except KeyboardInterrupt as e:
      logging.warning("interrupted by Ctrl-C%s", _during(e), exc_info=True,
                      extra=progress.FILE_ONLY)
      return fail(EXIT_INTERRUPTED, f"interrupted (Ctrl-C){_during(e)}; log: {log_path}")
    except Terminated as e:
      logging.warning("terminated by SIGTERM%s", _during(e), exc_info=True,
                      extra=progress.FILE_ONLY)
      return fail(EXIT_TERMINATED, f"terminated by SIGTERM{_during(e)}; rerun the same command "
                                   f"to continue (log: {log_path})")
    except Exception as e:  # Every failure becomes one line; the traceback goes to the log.
      if args.debug:
        raise
      logging.error("%s failed%s", prog, _during(e), exc_info=True, extra=progress.FILE_ONLY)
      return fail(EXIT_FAILURE, f"error: {one_line(e)} (traceback: {log_path})")


def one_line(error: BaseException) -> str:
  """An exception's message on one line: its first line, or its type when it has no message."""
  text = str(error).strip()
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = str(error.args[0])
  first = text.splitlines()[0] if text else type(error).__name__
  return first if first == text or not text else f"{first} …"
