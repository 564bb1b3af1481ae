"""i2b2/n2c2 2010 concept annotations (``.txt`` notes + ``.con`` files) → BIO-tagged sentences.

A note's ``.txt`` holds one sentence a line, tokens separated by whitespace. Each ``.con`` line
names one concept by line and token offsets (lines from 1, tokens from 0, end inclusive)::

  c="chest pain" 12:3 12:4||t="problem"

Records (ours): one per non-empty line of a note, ``{"id": "<note>:<line>", "tokens": [...],
"tags": [...]}`` with BIO tags over problem/treatment/test. A folder is searched recursively;
each ``.con`` is paired with the ``.txt`` of the same name wherever it lies under the folder (the
release keeps them in sibling ``txt/`` and ``concept/`` folders, the test notes and their reference
standard in separate ones), so give the folder that holds both. Notes without a ``.con`` are left
out and counted. The split unit is the note.
"""

from __future__ import annotations

import os
import re

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError, read_text

_CONCEPT = re.compile(r'c="(?P<text>.*)" (?P<l1>\d+):(?P<t1>\d+) (?P<l2>\d+):(?P<t2>\d+)'
                      r'\|\|t="(?P<type>[^"]*)"')


def _files_by_stem(folder: str, suffix: str) -> dict[str, str]:
  found: dict[str, str] = {}
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(suffix):
        stem, path = name[:-len(suffix)], os.path.join(root, name)
        if stem in found:
          raise RawFormatError(path, "", f"a second {suffix} file named {name} (the first is "
                               f"{found[stem]}); notes are paired with annotations by name")
        found[stem] = path
  return found


def _tag_note(con_path: str, lines: list[list[str]]) -> list[list[str]]:
  """BIO tags for each line's tokens from the concepts of ``con_path``."""
  tags = [["O"] * len(tokens) for tokens in lines]
  for number, raw in enumerate(read_text(con_path).splitlines(), 1):
    if not raw.strip():
      continue
    where = f"line {number}"
    match = _CONCEPT.fullmatch(raw.strip())
    if not match:
      raise RawFormatError(con_path, where, 'not a concept line c="..." L:T L:T||t="..."')
    kind = match["type"]
    if kind not in scorers.NER_CLASSES:
      raise RawFormatError(con_path, where, f"field t: label {kind!r} not in {scorers.NER_CLASSES}")
    line, first, end_line, last = (int(match[k]) for k in ("l1", "t1", "l2", "t2"))
    if line != end_line:
      raise RawFormatError(con_path, where, f"concept spans lines {line}-{end_line}; a concept "
                           "lies within one line")
    if not 1 <= line <= len(lines):
      raise RawFormatError(con_path, where, f"line {line} outside the note's {len(lines)} lines")
    tokens = lines[line - 1]
    if not 0 <= first <= last < len(tokens):
      raise RawFormatError(con_path, where, f"tokens {first}-{last} outside line {line}'s "
                           f"{len(tokens)} tokens")
    if " ".join(tokens[first:last + 1]).lower() != " ".join(match["text"].split()).lower():
      raise RawFormatError(con_path, where, f"field c does not match tokens {first}-{last} of "
                           f"line {line} (are the .txt and .con from the same note?)")
    span = tags[line - 1][first:last + 1]
    if any(tag != "O" for tag in span):
      raise RawFormatError(con_path, where, f"concept overlaps another on line {line}")
    tags[line - 1][first:last + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (last - first)
  return tags


def read(folder: str) -> Portion:
  if not os.path.isdir(folder):
    raise RawFormatError(folder, "", "expected a folder of .txt notes and .con files")
  notes = _files_by_stem(folder, ".txt")
  portion = Portion()
  for stem, con_path in sorted(_files_by_stem(folder, ".con").items()):
    if stem not in notes:
      raise RawFormatError(con_path, "", f"no note {stem}.txt under {folder}")
    lines = [line.split() for line in read_text(notes.pop(stem)).split("\n")]
    for number, (tokens, tags) in enumerate(zip(lines, _tag_note(con_path, lines)), 1):
      if tokens:
        portion.units.append((stem, {"id": f"{stem}:{number}", "tokens": tokens, "tags": tags}))
  portion.skipped["notes_without_concepts"] += len(notes)
  return portion
