"""The limit of ``--max_errors``, shared by the preparing commands (``scripts/prepare_corpus.py``,
``scripts/prepare_mibe.py``): how much damaged input a run may pass over before it fails, writing
nothing.

A value of 0 or from 1 up is a number of damaged items; one between 0 and 1 a fraction of the items
read; None, the default, no limit (damaged items are still logged by file and place and counted in
the summary). Only the standard library here, so that every preparer can import it cheaply.
"""

from __future__ import annotations

import argparse


def add_flag(parser: argparse.ArgumentParser, items: str) -> None:
  """``--max_errors``, worded for what the command reads (``items``: "records", "items")."""
  parser.add_argument("--max_errors", type=float,
                      help=f"fail, writing nothing, when more {items} than this are damaged: a "
                           f"count (100) or a fraction of the {items} read (0.01); default: no "
                           f"limit, damaged {items} are reported by file and position and passed "
                           "over")


def is_count(max_errors: float) -> bool:
  """``max_errors`` 0 or from 1 up is a number of errors; between 0 and 1, a fraction of the items."""
  return max_errors == 0 or max_errors >= 1


def check(max_errors: float | None) -> None:
  """Raises ValueError unless ``max_errors`` is None, a whole count, or a fraction in (0, 1)."""
  if max_errors is not None and (max_errors < 0 or max_errors >= 1 and max_errors % 1):
    raise ValueError(f"max_errors must be a whole count (0, 1, 2...) or a fraction between 0 and 1, "
                     f"got {max_errors:g}")


def exceeded(errors: int, read: int, max_errors: float | None) -> bool:
  """Whether ``errors`` damaged items of ``read`` pass ``max_errors``."""
  if max_errors is None:
    return False
  return errors > (max_errors if is_count(max_errors) else max_errors * read)


def describe(errors: int, read: int, max_errors: float, items: str) -> str:
  """The failure's figures, worded alike by every preparer: "2 of 11 records (18.18%) >
  max_errors 1"."""
  return f"{errors} of {read} {items} ({errors / max(read, 1):.2%}) > max_errors {max_errors:g}"
