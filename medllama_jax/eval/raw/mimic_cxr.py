"""MIMIC-CXR free-text reports (``files/pXX/pNNNNNNNN/sNNNNNNNN.txt``) → findings and impression.

Reports are read by the pre-training reader (``medllama_jax.data.corpora.read_mimic_cxr``: a folder
tree or a tar/zip package). A section starts at a line opening with an upper-case heading and a
colon (``FINDINGS:``, ``IMPRESSION:``) and runs to the next such heading; its text has whitespace
runs reduced to single spaces, as the release joined a report's sentences with spaces. Records:
``{"id": "cxr:<study>", "findings", "impression"}``. Reports lacking either section (or with it
empty) are left out and counted, as are files the reader rejects. The split unit is the study.
"""

from __future__ import annotations

import re

from medllama_jax.data import corpora
from medllama_jax.eval.raw.common import Portion

_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]*[A-Z)]):", re.MULTILINE)
SECTIONS = ("findings", "impression")


def report_sections(text: str) -> dict[str, str]:
  """Each headed section's text by its lower-cased heading (a repeated heading: the first)."""
  headings = list(_HEADING.finditer(text))
  sections: dict[str, str] = {}
  for heading, following in zip(headings, [*headings[1:], None]):
    body = text[heading.end():following.start() if following else len(text)]
    sections.setdefault(heading.group(1).lower(), " ".join(body.split()))
  return sections


def read(path: str) -> Portion:
  portion = Portion()
  for record in corpora.read("mimic_cxr", path):
    if isinstance(record, corpora.Rejected):
      portion.skipped[record.reason] += 1
      continue
    sections = report_sections(record.text)
    empty = [name for name in SECTIONS if not sections.get(name)]
    if empty:
      portion.skipped[f"no_{empty[0]}"] += 1
      continue
    portion.units.append((record.id, {"id": record.id, **{k: sections[k] for k in SECTIONS}}))
  return portion
