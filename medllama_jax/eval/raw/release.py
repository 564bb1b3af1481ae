"""The release's own MIBE test sets (parquet files) → evaluation sets that prompt with its queries.

The release built each evaluation set with ``src/preprocess_instruct.py`` (BIDS-Xu-Lab/Me-LLaMA)
and published it as parquet rows ``{id, query, answer, choices, gold}``: for a classification set
``choices`` lists the labels and ``gold`` is the index of the right one; for HoC ``gold`` is a 0/1
list over ``choices`` (the ten hallmarks in the release's order); a generation set (emrQA, the
summarisation sets) has ``answer``, the reference text, and may lack ``choices`` and ``gold``.
Scoring on exactly these items means prompting with their ``query``, not a prompt rebuilt from
another copy of the data, so each row becomes a record (``datasets.RELEASE_QUERIES_FILE``) with
``query`` kept byte for byte, ``answer`` (the text a correct model writes: the label, the labels
joined by ";", the reference) and ``gold`` in the format the dataset's scorer takes. A
multiple-choice record keeps ``choices``, which must be the dataset's options in the project's
order (``datasets.SPECS``; MedQA's may stop at D): the release's parser tries them in that order and
the option ranking scores them in it.

A row with a missing or unusable field is logged with the file, its row number (from 0, as the
release numbers its ids), its id and the field, left out and counted (``malformed_rows``); a file
that is missing, is not parquet or lacks a column stops the conversion with one line naming the file
and the column. i2b2 and MMLU have no release layout here: the release's NER rows were never
documented, and its MMLU asks for an option index (0-3) that the MMLU scorer does not read.
pyarrow is imported only when a file is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from medllama_jax.eval import datasets, scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError, Record

# How a dataset's rows name their answer (the construct method of preprocess_instruct.py).
CLASSIFICATION, MULTILABEL, GENERATION = "classification", "multilabel", "generation"
KINDS: dict[str, str] = {
    **dict.fromkeys(("pubmedqa", "medqa", "medmcqa", "ddi", "mtsample", "bionli", "mednli"),
                    CLASSIFICATION),
    "hoc": MULTILABEL,
    **dict.fromkeys(("emrqa", "pubmed_summarization", "mimic_cxr"), GENERATION),
}
COLUMNS: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("id", "query", "choices", "gold"),
    MULTILABEL: ("id", "query", "choices", "gold"),
    GENERATION: ("id", "query", "answer"),
}
DESCRIPTION = "the release's parquet test file (rows id, query, answer, choices, gold)"


class _Unusable(ValueError):
  """A row field that cannot be scored: ``field`` names it, the message says why."""

  def __init__(self, field: str, problem: str):
    super().__init__(problem)
    self.field = field


def check_dataset(dataset: str) -> None:
  """Refuses a dataset whose release rows this module cannot turn into its scorer's gold."""
  if dataset not in KINDS:
    raise ValueError(f"no release parquet layout for {dataset!r}; --release_parquet reads "
                     f"{', '.join(KINDS)}")


def _text(row: dict[str, Any], field: str) -> str:
  value = row[field]
  if value is None:
    raise _Unusable(field, "missing")
  if not isinstance(value, str):
    raise _Unusable(field, f"{type(value).__name__}, not text")
  if not value.strip():
    raise _Unusable(field, "empty")
  return value


def _choices(row: dict[str, Any]) -> list[str]:
  value = row["choices"]
  if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
    raise _Unusable("choices", "missing, empty or not a list of labels")
  return value


def _classification(row: dict[str, Any], options: Sequence[str]) -> Record:
  """The label ``choices[gold]``; the choices must open the dataset's option list, in order."""
  choices = _choices(row)
  if len(choices) > len(options) or list(options[:len(choices)]) != choices:
    raise _Unusable("choices", f"{choices} are not the dataset's options {list(options)} in order")
  index = row["gold"]
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(choices):
    raise _Unusable("gold", f"{index!r} is not an index into the {len(choices)} choices")
  label = choices[index]
  return {"answer": label, "gold": label, "choices": choices}


def _multilabel(row: dict[str, Any]) -> Record:
  """HoC: the hallmarks whose ``gold`` flag is 1, in the release's ``choices`` order."""
  choices = _choices(row)
  unknown = sorted(set(choices) - set(scorers.HOC_LABELS))
  if unknown or len(set(choices)) != len(choices):
    raise _Unusable("choices", f"not distinct hallmarks of the HoC label set (unknown: {unknown})")
  flags = row["gold"]
  if (not isinstance(flags, list) or len(flags) != len(choices)
      or any(isinstance(f, bool) or f not in (0, 1) for f in flags)):
    raise _Unusable("gold", f"not a 0/1 list over the {len(choices)} choices")
  labels = [label for label, flag in zip(choices, flags) if flag]
  return {"answer": ";".join(labels), "gold": labels}


def _generation(row: dict[str, Any]) -> Record:
  answer = _text(row, "answer")
  return {"answer": answer, "gold": answer}


def _row_id(row: dict[str, Any]) -> str:
  value = row["id"]
  if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
    raise _Unusable("id", "missing or not a string or integer")
  return str(value)


def _read_rows(path: str, columns: Sequence[str]) -> list[dict[str, Any]]:
  """The file's rows as Python values; a missing file or column is a one-line error."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found (expected {DESCRIPTION})")
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    table = pq.read_table(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise RawFormatError(path, "", f"not a readable parquet file "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
  for column in columns:
    if column not in table.column_names:
      raise RawFormatError(path, f"column {column}", f"missing (the file has "
                           f"{', '.join(table.column_names)})")
  return table.select(list(columns)).to_pylist()


def read(path: str, dataset: str) -> Portion:
  """The records of one release parquet test file of ``dataset``, in file order, each its own
  split unit; a row that cannot be scored is logged, counted and left out."""
  check_dataset(dataset)
  kind = KINDS[dataset]
  options = datasets.get_spec(dataset).options
  targets: Callable[[dict[str, Any]], Record] = {
      CLASSIFICATION: lambda row: _classification(row, options), MULTILABEL: _multilabel,
      GENERATION: _generation}[kind]
  portion = Portion()
  for number, row in enumerate(_read_rows(path, COLUMNS[kind])):
    try:
      row_id = _row_id(row)
      record = {"id": row_id, "query": _text(row, "query"), **targets(row)}
    except _Unusable as error:
      portion.leave_out("Release parquet", "row", RawFormatError(
          path, f"row {number} (id {row.get('id')})", f"field {error.field}: {error}"))
      continue
    portion.units.append((row_id, record))
  return portion
