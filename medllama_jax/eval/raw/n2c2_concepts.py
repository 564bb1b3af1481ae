"""i2b2/n2c2 2010 concept annotations (``.txt`` notes + ``.con`` files) → BIO-tagged sentences.

A note's ``.txt`` holds one sentence a line, tokens separated by whitespace. Each ``.con`` line
names one concept by line and token offsets (lines from 1, tokens from 0, end inclusive)::

  c="chest pain" 12:3 12:4||t="problem"

Records (ours): one per non-empty line of a note, ``{"id": "<note>:<line>", "tokens": [...],
"tags": [...]}`` with BIO tags over problem/treatment/test. A folder is searched recursively;
each ``.con`` is paired with the ``.txt`` of the same name wherever it lies under the folder (the
release keeps them in sibling ``txt/`` and ``concept/`` folders, the test notes and their reference
standard in separate ones), so give the folder that holds both. Notes without a ``.con`` are left
out and counted (``notes_without_concepts``). The split unit is the note.

A malformed concept line (an unknown type, token offsets outside its line, a concept over two
lines, text that differs from the note's tokens, an overlap with another concept) is logged with
its ``.con`` file, line and field and counted (``malformed_concepts``); the sentences it names are
left out, since their tags would miss it. A note is left out whole and counted
(``malformed_notes``) when a concept line names no line of it (not a concept line, a line outside
the note: which sentence lacks the concept is unknown), when its ``.txt`` or ``.con`` is not UTF-8,
or when a ``.con`` has no ``.txt`` of the same name. Two ``.txt`` (or ``.con``) files of one name
stop the conversion: which pairs with which is unknown.
"""

from __future__ import annotations

import os
import re

from absl import logging

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


def _placed(con_path: str, where: str, raw: str, note_lines: int) -> re.Match[str]:
  """A concept line parsed, its lines checked against the note's. A RawFormatError: the concept
  names no line of the note, so which sentence lacks it is unknown and the whole note is in doubt."""
  match = _CONCEPT.fullmatch(raw.strip())
  if not match:
    raise RawFormatError(con_path, where, 'not a concept line c="..." L:T L:T||t="..."')
  for field in ("l1", "l2"):
    if not 1 <= int(match[field]) <= note_lines:
      raise RawFormatError(con_path, where, f"line {match[field]} outside the note's "
                           f"{note_lines} lines")
  return match


def _tag_concept(con_path: str, where: str, match: re.Match[str], lines: list[list[str]],
                 tags: list[list[str]]) -> None:
  """Tags one placed concept's tokens; a RawFormatError names the field at fault."""
  kind = match["type"]
  if kind not in scorers.NER_CLASSES:
    raise RawFormatError(con_path, where, f"field t: label {kind!r} not in {scorers.NER_CLASSES}")
  line, first, end_line, last = (int(match[k]) for k in ("l1", "t1", "l2", "t2"))
  if line != end_line:
    raise RawFormatError(con_path, where, f"concept spans lines {line}-{end_line}; a concept "
                         "lies within one line")
  tokens = lines[line - 1]
  if not 0 <= first <= last < len(tokens):
    raise RawFormatError(con_path, where, f"tokens {first}-{last} outside line {line}'s "
                         f"{len(tokens)} tokens")
  if " ".join(tokens[first:last + 1]).lower() != " ".join(match["text"].split()).lower():
    raise RawFormatError(con_path, where, f"field c does not match tokens {first}-{last} of "
                         f"line {line} (are the .txt and .con from the same note?)")
  if any(tag != "O" for tag in tags[line - 1][first:last + 1]):
    raise RawFormatError(con_path, where, f"concept overlaps another on line {line}")
  tags[line - 1][first:last + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (last - first)


def _tag_note(con_path: str, lines: list[list[str]],
              portion: Portion) -> tuple[list[list[str]], set[int]]:
  """BIO tags for each line's tokens from the concepts of ``con_path``, and the note lines that a
  malformed concept leaves out (their tags would miss it). A RawFormatError: the note is in
  doubt."""
  tags = [["O"] * len(tokens) for tokens in lines]
  damaged: set[int] = set()
  for number, raw in enumerate(read_text(con_path).splitlines(), 1):
    if not raw.strip():
      continue
    where = f"line {number}"
    match = _placed(con_path, where, raw, len(lines))
    try:
      _tag_concept(con_path, where, match, lines, tags)
    except RawFormatError as error:
      portion.leave_out("i2b2", "concept", error)
      damaged.update({int(match["l1"]), int(match["l2"])})
  return tags, damaged


def _read_note(stem: str, note_path: str, con_path: str, portion: Portion) -> None:
  """The sentence records of one note, less those a malformed concept touches."""
  lines = [line.split() for line in read_text(note_path).split("\n")]
  tags, damaged = _tag_note(con_path, lines, portion)
  for number, (tokens, line_tags) in enumerate(zip(lines, tags), 1):
    if tokens and number not in damaged:
      portion.units.append((stem, {"id": f"{stem}:{number}", "tokens": tokens, "tags": line_tags}))


def read(folder: str) -> Portion:
  """The sentence records of every annotated note under ``folder``; damaged concepts and notes are
  left out and counted."""
  if not os.path.isdir(folder):
    raise RawFormatError(folder, "", "expected a folder of .txt notes and .con files")
  notes = _files_by_stem(folder, ".txt")
  portion = Portion()
  for stem, con_path in sorted(_files_by_stem(folder, ".con").items()):
    try:
      if stem not in notes:
        raise RawFormatError(con_path, "", f"no note {stem}.txt under {folder}")
      _read_note(stem, notes.pop(stem), con_path, portion)
    except RawFormatError as error:
      portion.leave_out("i2b2", "note", error)
  for note_path in notes.values():
    logging.info("i2b2: %s left out: no .con file of the same name under %s", note_path, folder)
  portion.skipped["notes_without_concepts"] += len(notes)
  return portion
