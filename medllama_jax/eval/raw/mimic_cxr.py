"""MIMIC-CXR free-text reports (``files/pXX/pNNNNNNNN/sNNNNNNNN.txt``) → findings and impression.

Reports are read by the pre-training reader (``medllama_jax.data.corpora.read_mimic_cxr``: a folder
tree or a tar/zip package). A section starts at a line opening with an upper-case heading and a
colon (``FINDINGS:``, ``IMPRESSION:``) and runs to the next such heading; its text has whitespace
runs reduced to single spaces, as the release joined a report's sentences with spaces. Records:
``{"id": "cxr:<study>", "findings", "impression"}``. The split unit is the study.

What is left out is logged with the file (or package member) and counted: by design, reports
lacking either section or with it empty (``no_findings``, ``no_impression``: many studies have no
findings) and ``.txt`` files not named ``s<digits>.txt`` (``not_a_report``); as damage, a report
that is empty, not UTF-8 or, in a folder tree, cannot be read (``malformed_reports``). A package
that ends early (truncated or corrupt tar/zip) stops the conversion: nothing after that point can
be read, so the records would be an arbitrary part of the release.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from absl import logging

from medllama_jax.data import corpora
from medllama_jax.eval.raw.common import Portion, RawFormatError

_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]*[A-Z)]):", re.MULTILINE)
SECTIONS = ("findings", "impression")
# The pre-training reader's reasons for an input that ends early (corpora.read).
_INPUT_ENDED = frozenset({"truncated_file", "corrupt_file", "unreadable_file", "bad_xml"})


def report_sections(text: str) -> dict[str, str]:
  """Each headed section's text by its lower-cased heading (a repeated heading: the first)."""
  headings = list(_HEADING.finditer(text))
  sections: dict[str, str] = {}
  for heading, following in zip(headings, [*headings[1:], None]):
    body = text[heading.end():following.start() if following else len(text)]
    sections.setdefault(heading.group(1).lower(), " ".join(body.split()))
  return sections


def _reports(path: str) -> Iterator[tuple[str, corpora.Record]]:
  """(input, record) of each report. A folder tree's files are read one by one, so that a file
  that cannot be read costs that report alone; a package or a single file is read as a whole."""
  if not os.path.isdir(path):
    yield from ((path, record) for record in corpora.read("mimic_cxr", path))
    return
  for root, dirs, names in os.walk(path):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(".txt"):
        report = os.path.join(root, name)
        yield from ((report, record) for record in corpora.read("mimic_cxr", report))


def _rejected(path: str, source: str, record: corpora.Rejected, portion: Portion) -> None:
  """Counts a report the reader rejects; a package that ends early is an error (see above)."""
  if record.reason == "not_a_report":
    logging.info("MIMIC-CXR: %s: %s left out: not named s<digits>.txt", source, record.location)
    portion.skipped[record.reason] += 1
  elif record.reason in _INPUT_ENDED and source == path:
    raise RawFormatError(path, record.location, f"{record.reason}: the input cannot be read past "
                         "this point")
  else:
    problem = "not UTF-8" if record.reason == "not_utf8" else f"cannot be read ({record.reason})"
    where = record.location if source == path else ""  # A folder's file is named by its path.
    portion.leave_out("MIMIC-CXR", "report", RawFormatError(source, where, problem))


def read(path: str) -> Portion:
  """The reports of a folder tree, package or file with both sections; the others are counted."""
  portion = Portion()
  for source, record in _reports(path):
    if isinstance(record, corpora.Rejected):
      _rejected(path, source, record, portion)
      continue
    if not record.text.strip():
      portion.leave_out("MIMIC-CXR", "report", RawFormatError(source, record.id, "empty report"))
      continue
    sections = report_sections(record.text)
    empty = [name for name in SECTIONS if not sections.get(name)]
    if empty:
      logging.info("MIMIC-CXR: %s: %s left out: no %s section", source, record.id,
                   empty[0].upper())
      portion.skipped[f"no_{empty[0]}"] += 1
      continue
    portion.units.append((record.id, {"id": record.id, **{k: sections[k] for k in SECTIONS}}))
  return portion
