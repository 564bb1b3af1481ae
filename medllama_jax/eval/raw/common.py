"""What every MIBE raw-release converter shares: errors that name the place at fault, the seeded
train/test split, and the writers of the file formats ``datasets.SPECS`` reads."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO

from absl import logging

Record = dict[str, Any]
# A record and its split unit: the id of what must not be divided between test and few-shot pool
# (a note, an abstract, a drug-pair's document, a transcription).
Unit = tuple[str, Record]
# The prefix of the summary's counts of damaged pieces (``malformed_rows``, ``malformed_notes``...).
MALFORMED = "malformed_"


class RawFormatError(ValueError):
  """Malformed raw input. The message names the file, where in it (line, element id, row) and what
  is wrong with which field; it never quotes clinical text."""

  def __init__(self, path: str, where: str, problem: str):
    super().__init__(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")


@dataclasses.dataclass
class Portion:
  """What one reader produced from one raw input: its records with their split units, and how many
  pieces of the input it left out, by reason (reported in the summary, never dropped silently).

  Damage is counted only through :meth:`leave_out` (``malformed_*``); other reasons are what a
  converter leaves out by design. ``--max_errors`` weighs the damaged pieces against :attr:`read`.
  """
  units: list[Unit] = dataclasses.field(default_factory=list)
  skipped: Counter[str] = dataclasses.field(default_factory=Counter)

  @property
  def read(self) -> int:
    """The items met: each record kept and each piece left out, whatever it held (a left-out note
    counts once). Every reader fills ``units`` and ``skipped`` alike, so this needs no bookkeeping of
    its own and means the same for every converter."""
    return len(self.units) + sum(self.skipped.values())
  def leave_out(self, source: str, piece: str, error: RawFormatError) -> None:
    """Leaves a malformed ``piece`` (row, note, report...) out rather than stop the conversion:
    logged with the file, place and field at fault, counted as ``malformed_{piece}s``, so that one
    damaged item costs itself and the summary still says what was lost."""
    logging.warning("%s: malformed %s left out: %s", source, piece, error)
    self.skipped[f"{MALFORMED}{piece}s"] += 1


def read_text(path: str) -> str:
  """A UTF-8 text file; an undecodable byte is an error naming its offset."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise RawFormatError(path, f"byte {e.start}", "not UTF-8") from None


# A CSV data row: its number (from 1), where it is ("row N (line L)"), and its fields by column
# name, or what makes it unreadable.
CsvRow = tuple[int, str, dict[str, str] | RawFormatError]


def csv_rows(path: str, strict: bool = False) -> tuple[list[str], Iterator[CsvRow]]:
  """The header of a CSV file and its data rows, one at a time; blank lines are passed over.

  A row that does not parse (``strict``: a quote out of place) or has another number of fields
  than the header comes as the error naming it, so that the caller can leave that row alone out:
  the reader goes on at the next line.
  """
  reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=strict)
  header = next(reader, [])

  def rows() -> Iterator[CsvRow]:
    number = 0
    while True:
      start = reader.line_num + 1
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        number += 1
        where = f"row {number} (line {start})"
        yield number, where, RawFormatError(path, where, f"CSV: {e}")
        continue
      if not fields:
        continue
      number += 1
      where = f"row {number} (line {start})"
      if len(fields) != len(header):
        yield number, where, RawFormatError(path, where, f"{len(fields)} fields, the header has "
                                            f"{len(header)}")
      else:
        yield number, where, dict(zip(header, fields))

  return header, rows()


def split_units(units: Sequence[Unit], seed: int, test_fraction: float,
                source: str) -> tuple[list[Record], list[Record]]:
  """(test, train) records: ``round(test_fraction * n)`` of the n distinct units (at least one,
  never all) drawn by a ``seed``-ed shuffle of their sorted ids; records keep their input order.

  The draw depends on the set of unit ids alone, so reruns on the same release agree.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction={test_fraction} must be between 0 and 1")
  ids = sorted({unit for unit, _ in units})
  if len(ids) < 2:
    raise ValueError(f"{source}: {len(ids)} split unit(s) found; a test set and a few-shot pool "
                     "need at least 2")
  random.Random(seed).shuffle(ids)
  count = min(max(round(test_fraction * len(ids)), 1), len(ids) - 1)
  test_ids = set(ids[:count])
  test = [record for unit, record in units if unit in test_ids]
  train = [record for unit, record in units if unit not in test_ids]
  return test, train


def write_jsonl(f: TextIO, records: Iterable[Record]) -> None:
  for record in records:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_csv(f: TextIO, records: Sequence[Record]) -> None:
  """Rows with the columns of the first record, in its order (all records share them)."""
  writer = csv.DictWriter(f, fieldnames=list(records[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows(records)


def write_squad(f: TextIO, records: Sequence[Record]) -> None:
  """SQuAD json: paragraph records (``title``, ``context``, ``qas``) grouped under their title."""
  articles: dict[str, list[Record]] = {}
  for record in records:
    articles.setdefault(record["title"], []).append(
        {key: value for key, value in record.items() if key != "title"})
  data = [{"title": title, "paragraphs": paragraphs} for title, paragraphs in articles.items()]
  json.dump({"version": "1.1", "data": data}, f, ensure_ascii=False)


Writer = Callable[[TextIO, Sequence[Record]], None]
