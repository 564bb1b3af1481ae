"""Console logging for the command-line tools: our progress at INFO, libraries' chatter at WARNING."""

from __future__ import annotations

import logging as py_logging

from absl import flags, logging

_NOISY_LIBRARIES = ("orbax", "jax", "tensorflow", "absl/flags")


class _QuietLibraries(py_logging.Filter):
  """Orbax logs every read and write at INFO through absl; keep only its warnings and errors."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(f"/{name}/" in record.pathname for name in _NOISY_LIBRARIES)
    return record.levelno >= py_logging.WARNING or not noisy


def setup(verbosity: int = logging.INFO) -> None:
  """Call once at the start of a command-line tool (these tools parse their own flags with argparse)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(verbosity)
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
