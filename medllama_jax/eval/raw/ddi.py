"""DDI 2013 in either public layout, told apart by the path: the corpus's XML folders
(:mod:`ddi_xml`) or BLUE's ``ddi2013-type`` files (``train.tsv``, ``dev.tsv``, ``test.tsv``).

BLUE's files are tab-separated with the header ``index\tsentence\tlabel`` (quoted where a field
holds a quote, as Python's csv writer does): ``index`` the pair id (``DDI-DrugBank.d519.s3.p2``),
``sentence`` the sentence with the pair's mentions already replaced by ``@DRUG$`` (or one
``@DRUG-DRUG$`` for overlapping mentions), ``label`` one of ``DDI-advise``, ``DDI-effect``,
``DDI-int``, ``DDI-mechanism``, ``DDI-false``: the labels of ``scorers.DDI_LABELS`` as spelled.
Records are the XML reader's, ``{"id", "sentence", "label"}``; the split unit is the document,
the pair id less its ``.sN.pN``. A row with the wrong number of fields, an unknown label or no pair
of markers is logged with its file, line and field, left out and counted (``malformed_rows``).
"""

from __future__ import annotations

import csv
import os
import re

from medllama_jax.eval import scorers
from medllama_jax.eval.raw import ddi_xml
from medllama_jax.eval.raw.common import Portion, Record, RawFormatError, read_text

BLUE_HEADER = ["index", "sentence", "label"]
_PAIR_ID = re.compile(r"(?P<document>.+)\.s\d+\.p\d+")


def _document(pair_id: str) -> str:
  """The document a pair id belongs to: the split unit, as for the XML layout."""
  match = _PAIR_ID.fullmatch(pair_id)
  return match["document"] if match else pair_id


def _record(path: str, line: int, row: list[str]) -> Record:
  where = f"line {line}"
  if len(row) != len(BLUE_HEADER):
    raise RawFormatError(path, where, f"{len(row)} fields, expected {len(BLUE_HEADER)} "
                         f"({', '.join(BLUE_HEADER)})")
  pair_id, sentence, label = row
  where = f"line {line}, pair {pair_id}"
  if label not in scorers.DDI_LABELS:
    raise RawFormatError(path, where, f"field label: {label!r} not in {scorers.DDI_LABELS}")
  pair_marked = sentence.count(ddi_xml.DRUG_MARK) == 2 and ddi_xml.OVERLAP_MARK not in sentence
  if not pair_marked and sentence.count(ddi_xml.OVERLAP_MARK) != 1:
    raise RawFormatError(path, where, f"field sentence holds neither two {ddi_xml.DRUG_MARK} nor "
                         f"one {ddi_xml.OVERLAP_MARK}")
  return {"id": pair_id, "sentence": sentence, "label": label}


def read_blue_tsv(path: str) -> Portion:
  """The pair records of one of BLUE's DDI files; malformed rows are left out and counted."""
  reader = csv.reader(read_text(path).splitlines(keepends=True), delimiter="\t")
  header = next(reader, None)
  if header != BLUE_HEADER:
    raise RawFormatError(path, "line 1", f"header {header} is not BLUE's {BLUE_HEADER}")
  portion = Portion()
  for row in filter(None, reader):
    try:
      record = _record(path, reader.line_num, row)
    except RawFormatError as error:
      portion.leave_out("DDI", "row", error)
      continue
    portion.units.append((_document(record["id"]), record))
  return portion


def read(path: str) -> Portion:
  """BLUE's layout for a ``.tsv`` file, the corpus's XML layout otherwise."""
  if os.path.isfile(path) and path.endswith(".tsv"):
    return read_blue_tsv(path)
  return ddi_xml.read(path)
