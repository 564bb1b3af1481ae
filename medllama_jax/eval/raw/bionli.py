"""BioNLI CSV files → premise / hypothesis / label records.

BioNLI pairs a set of supporting sentences from an abstract (``supp_set``) with a conclusion
(``conclusion``): the abstract's own (consistent) or a perturbed one (inconsistent). Its authors'
code reads these columns and the perturbation category ``label_cat``, ``pos`` for the original
conclusion; a file may instead carry ``label`` as ``pos``/``neg`` or ``entailment``/
``contradiction``. BioNLI is two-way: records (ours) are ``{"id", "premise", "hypothesis",
"label"}`` with label ``entailment`` or ``contradiction``. The split unit is the abstract
(``pmid`` when the file has it, else the row); the released test file can be given instead.

A row with another number of fields than the header (or one the CSV reader rejects), an empty
premise or hypothesis, or an unknown label is logged with its file, row, line and field, left out
and counted (``malformed_rows``). Only a header without the columns above stops the conversion.
"""

from __future__ import annotations

from medllama_jax.eval.raw.common import Portion, RawFormatError, Record, csv_rows

_LABELS = {"pos": "entailment", "neg": "contradiction", "entailment": "entailment",
           "contradiction": "contradiction"}


def _label(path: str, where: str, row: dict[str, str]) -> str:
  if "label" in row:
    value = row["label"].strip().lower()
    if value not in _LABELS:
      raise RawFormatError(path, where, f"field label: {value!r} not in {sorted(_LABELS)}")
    return _LABELS[value]
  category = row["label_cat"].strip()
  if not category:
    raise RawFormatError(path, where, "field label_cat is empty")
  return "entailment" if category == "pos" else "contradiction"


def _record(path: str, number: int, where: str,
            row: dict[str, str] | RawFormatError) -> tuple[str, Record]:
  """A row's split unit and record; a RawFormatError names what makes it unusable."""
  if isinstance(row, RawFormatError):
    raise row
  if not row["supp_set"].strip() or not row["conclusion"].strip():
    raise RawFormatError(path, where, "field supp_set or conclusion is empty")
  unit = row.get("pmid") or f"row {number}"
  return unit, {"id": f"{unit}:{number}", "premise": row["supp_set"].strip(),
                "hypothesis": row["conclusion"].strip(), "label": _label(path, where, row)}


def read(path: str) -> Portion:
  """The records of one BioNLI CSV file; a malformed row is left out and counted, a header
  without the columns needed stops the conversion (no row could be read)."""
  columns, rows = csv_rows(path)
  if not {"supp_set", "conclusion"} <= set(columns) or not {"label", "label_cat"} & set(columns):
    raise RawFormatError(path, "header", "need columns supp_set, conclusion and label or "
                         f"label_cat; found {list(columns)}")
  portion = Portion()
  for number, where, row in rows:
    try:
      portion.units.append(_record(path, number, where, row))
    except RawFormatError as error:
      portion.leave_out("BioNLI", "row", error)
  return portion
