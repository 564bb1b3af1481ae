"""Hallmarks of Cancer corpus → one record per abstract, from either public layout.

The corpus's own release (github.com/sb895/Hallmarks-of-Cancer, a folder) has ``text/<PMID>.txt``
(one tokenised sentence a line) and ``labels/<PMID>.txt``: for each sentence, in order, a ``<``
followed by its labels, several joined by ``AND``, each a path in the hallmark taxonomy
(``Resisting cell death--Apoptosis``); a sentence without a label has a blank.

Records: ``{"id": PMID, "text": the sentences joined by spaces, "labels": [...]}`` with the
top-level hallmarks of any of its sentences, in ``scorers.HOC_LABELS`` order and spelling: the
release's HoC prompt asks about an abstract, so the abstract is the unit (ours; the release's own
preprocessed file is not public). The split unit is the abstract.

BLUE's ``hoc`` files (``train.tsv``, ``dev.tsv``, ``test.tsv``, a ``.tsv`` path) hold one sentence
a row under the header ``labels\tsentence\tindex`` (columns found by name): ``index`` is
``PMID_sN`` (the N-th sentence of abstract PMID, the abstract being what precedes the first
``_``, as BLUE's ``eval_hoc.py`` reads it), ``labels`` is ``0_0,1_1,...``, where ``i_1`` says the
i-th hallmark of BLUE's alphabetical list (``BLUE_LABELS``) is present. The abstract's text is its
sentences in sentence-number order, its labels the union of theirs. A row whose index does not
parse is logged with its file, line and field, left out and counted (``malformed_rows``); an
abstract with a malformed row (field count, labels, a sentence number seen twice) is logged at its
first fault, left out whole, since its labels would be incomplete, and counted
(``malformed_abstracts``).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, Record, RawFormatError, read_text

_HALLMARKS = {label.casefold(): label for label in scorers.HOC_LABELS}
_LABEL_SEPARATOR = re.compile(r"\s+AND")
# BLUE's label order (``LABELS`` of its eval_hoc.py): the ten hallmarks, alphabetically.
BLUE_LABELS = tuple(sorted(scorers.HOC_LABELS))
BLUE_COLUMNS = ("labels", "sentence", "index")
_BLUE_INDEX = re.compile(r"(?P<pmid>[^_]+)_s(?P<sentence>\d+)")
_BLUE_LABEL = re.compile(r"(?P<label>\d+)_(?P<present>[01])")


def _hallmarks(path: str, sentence: int, field: str) -> set[str]:
  found = set()
  for label in _LABEL_SEPARATOR.split(field):
    top = label.split("--")[0].strip()
    if not top:
      continue
    if top.casefold() not in _HALLMARKS:
      raise RawFormatError(path, f"sentence {sentence}", f"label {top!r} not among the ten "
                           f"hallmarks {scorers.HOC_LABELS}")
    found.add(_HALLMARKS[top.casefold()])
  return found


def _abstract(text_path: str, labels_path: str) -> tuple[str, list[str]]:
  sentences = [line.strip() for line in read_text(text_path).splitlines() if line.strip()]
  head, *fields = read_text(labels_path).split("<")
  if head.strip():
    raise RawFormatError(labels_path, "", "does not start with '<'")
  if len(fields) != len(sentences):
    raise RawFormatError(labels_path, "", f"{len(fields)} label fields for the {len(sentences)} "
                         f"sentences of {text_path}")
  found = set().union(*(_hallmarks(labels_path, k, f) for k, f in enumerate(fields, 1)))
  return " ".join(sentences), [label for label in scorers.HOC_LABELS if label in found]


def read_folder(folder: str) -> Portion:
  """The abstracts of the corpus's own release (``text/``, ``labels/``)."""
  texts, labels = os.path.join(folder, "text"), os.path.join(folder, "labels")
  if not (os.path.isdir(texts) and os.path.isdir(labels)):
    raise RawFormatError(folder, "", "expected the corpus folder with text/ and labels/")
  portion = Portion()
  for name in sorted(os.listdir(texts)):
    if not name.endswith(".txt"):
      continue
    labels_path = os.path.join(labels, name)
    if not os.path.isfile(labels_path):
      raise RawFormatError(os.path.join(texts, name), "", f"no labels file {labels_path}")
    pmid = name[:-len(".txt")]
    text, hallmarks = _abstract(os.path.join(texts, name), labels_path)
    portion.units.append((pmid, {"id": pmid, "text": text, "labels": hallmarks}))
  return portion


def _blue_labels(path: str, where: str, field: str) -> set[str]:
  """The hallmarks a ``labels`` field marks present (``i_1``)."""
  found = set()
  for item in field.split(","):
    match = _BLUE_LABEL.fullmatch(item.strip())
    if not match or int(match["label"]) >= len(BLUE_LABELS):
      raise RawFormatError(path, where, f"field labels: {item!r} is not i_0 or i_1 with i below "
                           f"{len(BLUE_LABELS)}")
    if match["present"] == "1":
      found.add(BLUE_LABELS[int(match["label"])])
  return found


def _blue_rows(path: str) -> Iterator[tuple[int, dict[str, str] | None]]:
  """(line, row by column name) of a BLUE TSV file whose header names the columns; ``None`` for a
  row with another number of fields."""
  reader = csv.reader(read_text(path).splitlines(keepends=True), delimiter="\t")
  header = next(reader, None) or []
  if sorted(header) != sorted(BLUE_COLUMNS):
    raise RawFormatError(path, "line 1", f"header {header} does not name BLUE's columns "
                         f"{list(BLUE_COLUMNS)}")
  for row in filter(None, reader):
    yield reader.line_num, dict(zip(header, row)) if len(row) == len(header) else None


def _blue_abstract(pmid: str, sentences: dict[int, str], labels: set[str]) -> Record:
  text = " ".join(sentences[k].strip() for k in sorted(sentences))
  return {"id": pmid, "text": text, "labels": [label for label in scorers.HOC_LABELS
                                               if label in labels]}


def read_blue_tsv(path: str) -> Portion:
  """The abstracts of one of BLUE's HoC files; a malformed row costs its abstract (or itself,
  when the abstract is unknown), logged and counted."""
  portion = Portion()
  sentences: dict[str, dict[int, str]] = {}
  labels: dict[str, set[str]] = {}
  damaged: set[str] = set()
  for line, row in _blue_rows(path):
    match = _BLUE_INDEX.fullmatch(row["index"]) if row else None
    if not match:
      portion.leave_out("HoC", "row", RawFormatError(
          path, f"line {line}", f"not {len(BLUE_COLUMNS)} fields, or field index not PMID_sN"))
      continue
    pmid, number = match["pmid"], int(match["sentence"])
    if pmid in damaged:  # Left out already, at its first fault.
      continue
    found = sentences.setdefault(pmid, {})
    try:
      if number in found:
        raise RawFormatError(path, f"line {line}", f"field index {row['index']} seen before")
      labels.setdefault(pmid, set()).update(
          _blue_labels(path, f"line {line}, sentence {row['index']}", row["labels"]))
    except RawFormatError as error:
      portion.leave_out("HoC", "abstract", error)
      damaged.add(pmid)
    found[number] = row["sentence"]
  portion.units.extend((pmid, _blue_abstract(pmid, found, labels.get(pmid, set())))
                       for pmid, found in sentences.items() if pmid not in damaged)
  return portion


def read(path: str) -> Portion:
  """BLUE's layout for a ``.tsv`` file, the corpus's own folder otherwise."""
  if os.path.isfile(path) and path.endswith(".tsv"):
    return read_blue_tsv(path)
  return read_folder(path)
