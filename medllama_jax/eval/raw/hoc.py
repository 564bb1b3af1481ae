"""Hallmarks of Cancer corpus (github.com/sb895/Hallmarks-of-Cancer) → one record per abstract.

The release has ``text/<PMID>.txt`` (one tokenised sentence a line) and ``labels/<PMID>.txt``: for
each sentence, in order, a ``<`` followed by its labels, several joined by ``AND``, each a path in
the hallmark taxonomy (``Resisting cell death--Apoptosis``); a sentence without a label has a blank.

Records: ``{"id": PMID, "text": the sentences joined by spaces, "labels": [...]}`` with the
top-level hallmarks of any of its sentences, in ``scorers.HOC_LABELS`` order and spelling: the
release's HoC prompt asks about an abstract, so the abstract is the unit (ours; the release's own
preprocessed file is not public). The split unit is the abstract.
"""

from __future__ import annotations

import os
import re

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError, read_text

_HALLMARKS = {label.casefold(): label for label in scorers.HOC_LABELS}
_LABEL_SEPARATOR = re.compile(r"\s+AND")


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


def read(folder: str) -> Portion:
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
