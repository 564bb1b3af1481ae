"""BioNLI CSV files → premise / hypothesis / label records.

BioNLI pairs a set of supporting sentences from an abstract (``supp_set``) with a conclusion
(``conclusion``): the abstract's own (consistent) or a perturbed one (inconsistent). Its authors'
code reads these columns and the perturbation category ``label_cat``, ``pos`` for the original
conclusion; a file may instead carry ``label`` as ``pos``/``neg`` or ``entailment``/
``contradiction``. BioNLI is two-way: records (ours) are ``{"id", "premise", "hypothesis",
"label"}`` with label ``entailment`` or ``contradiction``. The split unit is the abstract
(``pmid`` when the file has it, else the row); the released test file can be given instead.
"""

from __future__ import annotations

import csv
import io

from medllama_jax.eval.raw.common import Portion, RawFormatError, read_text

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


def read(path: str) -> Portion:
  rows = csv.DictReader(io.StringIO(read_text(path), newline=""))
  columns = rows.fieldnames or ()
  if not {"supp_set", "conclusion"} <= set(columns) or not {"label", "label_cat"} & set(columns):
    raise RawFormatError(path, "header", "need columns supp_set, conclusion and label or "
                         f"label_cat; found {list(columns)}")
  portion = Portion()
  try:
    for number, row in enumerate(rows, 1):
      where = f"row {number} (line {rows.line_num})"
      if None in row or None in row.values():
        raise RawFormatError(path, where, "wrong number of fields")
      if not row["supp_set"].strip() or not row["conclusion"].strip():
        raise RawFormatError(path, where, "field supp_set or conclusion is empty")
      unit = row.get("pmid") or f"row {number}"
      portion.units.append((unit, {"id": f"{unit}:{number}", "premise": row["supp_set"].strip(),
                                   "hypothesis": row["conclusion"].strip(),
                                   "label": _label(path, where, row)}))
  except csv.Error as e:
    raise RawFormatError(path, f"line {rows.line_num}", f"CSV: {e}") from None
  return portion
