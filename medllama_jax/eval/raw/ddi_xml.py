"""DDI Extraction 2013 corpus (XML) → one record per candidate drug pair.

Each file is a ``<document>`` of ``<sentence id text>`` elements holding ``<entity id charOffset
type text>`` (offsets into the sentence text, end inclusive; a discontinuous mention lists several
``a-b`` ranges joined by ``;``) and ``<pair id e1 e2 ddi="true|false" type>`` (type mechanism,
effect, advise or int when ddi is true). Mentions may nest or overlap.

Records: ``{"id": pair id, "sentence", "label"}``: the label is ``DDI-<type>`` or ``DDI-false``;
the sentence has the pair's two mentions replaced by ``@DRUG$``, as the release's prompt describes
its input ("a sentence where the drug is labeled as @DRUG$") and as BLUE's ``create_ddi_bert.py``
writes them; other drug mentions stay as written. Two mentions that overlap or touch become one
``@DRUG-DRUG$`` covering both, BLUE's rule for them (its published TSV uses that marker). A pair
with a discontinuous mention is left out and counted (``discontinuous_pairs``): its mention is no
span of the text to replace. BLUE's script reads only such a mention's first range and keeps the
pair, so BLUE's files hold a few pairs this reader leaves out. Every ``.xml`` under the given folder
is read (the release's ``Train/`` or ``Test/...`` folders, DrugBank and MedLine alike); the split
unit is the document.

A malformed entity, pair or sentence (an offset outside its sentence, a mention text that differs
from the sentence at its offset, an unknown label, a pair naming no entity of its sentence) does
not stop the conversion: it is logged with the file, the element id and the field, and its pairs
are left out and counted (``malformed_pairs``, ``malformed_sentences``). Only a file that is not
well-formed XML stops it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from absl import logging

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError

DRUG_MARK = "@DRUG$"
OVERLAP_MARK = "@DRUG-DRUG$"
_TYPES = tuple(label.removeprefix("DDI-") for label in scorers.DDI_LABELS if label != "DDI-false")

# A mention's [start, end) ranges in its sentence, or what makes it unusable.
Mention = list[tuple[int, int]] | str


def _ranges(entity: ET.Element, text: str) -> list[tuple[int, int]]:
  """The entity's [start, end) ranges, checked against the sentence text and its text field;
  a ValueError names the entity and the field at fault."""
  where = f"entity {entity.get('id')}"
  offset = entity.get("charOffset")
  try:
    ranges = [tuple(int(x) for x in piece.split("-")) for piece in (offset or "").split(";")]
  except ValueError:
    raise ValueError(f"{where}: field charOffset {offset!r} is not a-b[;c-d]") from None
  if any(len(r) != 2 or not 0 <= r[0] <= r[1] < len(text) for r in ranges):
    raise ValueError(f"{where}: field charOffset {offset} outside its sentence "
                     f"({len(text)} characters)")
  if len(ranges) == 1 and text[ranges[0][0]:ranges[0][1] + 1] != entity.get("text"):
    raise ValueError(f"{where}: field text differs from the sentence at charOffset")
  return [(start, end + 1) for start, end in ranges]


def _mention(entity: ET.Element, text: str) -> Mention:
  """An entity's ranges, or its fault: only the pairs that name it are lost."""
  try:
    return _ranges(entity, text)
  except ValueError as error:
    return str(error)


def _label(path: str, pair: ET.Element) -> str:
  where = f"pair {pair.get('id')}"
  ddi = pair.get("ddi")
  if ddi == "false":
    return "DDI-false"
  if ddi != "true":
    raise RawFormatError(path, where, f"field ddi {ddi!r} is neither 'true' nor 'false'")
  kind = pair.get("type")
  if kind not in _TYPES:
    raise RawFormatError(path, where, f"field type: label {kind!r} not in {_TYPES}")
  return f"DDI-{kind}"


def mark(text: str, first: tuple[int, int], second: tuple[int, int]) -> str:
  """The sentence with two [start, end) mentions replaced by markers; mentions that overlap or
  touch (BLUE's test: one starts or ends within the other, ends included) become one marker."""
  (s1, e1), (s2, e2) = sorted([first, second])
  if s2 <= e1:
    return f"{text[:s1]}{OVERLAP_MARK}{text[max(e1, e2):]}"
  return f"{text[:s1]}{DRUG_MARK}{text[e1:s2]}{DRUG_MARK}{text[e2:]}"


def _pair_mentions(path: str, sentence: ET.Element, pair: ET.Element,
                   mentions: dict[str | None, Mention]) -> list[list[tuple[int, int]]]:
  """The pair's two mentions; an error when a field names no entity or a usable one."""
  found = []
  for field in ("e1", "e2"):
    mention = mentions.get(pair.get(field))
    if mention is None:
      raise RawFormatError(path, f"pair {pair.get('id')}", f"field {field} {pair.get(field)!r} "
                           f"is no entity of sentence {sentence.get('id')}")
    if isinstance(mention, str):
      raise RawFormatError(path, f"pair {pair.get('id')}", f"field {field} names a malformed "
                           f"{mention}")
    found.append(mention)
  return found


def _read_sentence(path: str, unit: str, sentence: ET.Element, portion: Portion) -> None:
  text = sentence.get("text")
  if text is None:
    pairs = len(sentence.findall("pair"))
    portion.leave_out("DDI", "sentence", RawFormatError(
        path, f"sentence {sentence.get('id')}", f"no field text (its {pairs} pair(s) left out)"))
    return
  mentions = {entity.get("id"): _mention(entity, text) for entity in sentence.iter("entity")}
  for pair in sentence.iter("pair"):
    try:
      first, second = _pair_mentions(path, sentence, pair, mentions)
      label = _label(path, pair)
    except RawFormatError as error:
      portion.leave_out("DDI", "pair", error)
      continue
    if len(first) > 1 or len(second) > 1:
      logging.info("DDI: %s: pair %s left out: a discontinuous mention", path, pair.get("id"))
      portion.skipped["discontinuous_pairs"] += 1
      continue
    portion.units.append((unit, {"id": pair.get("id"), "sentence": mark(text, first[0], second[0]),
                                 "label": label}))


def _read_document(path: str, portion: Portion) -> None:
  try:
    document = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise RawFormatError(path, "line {}, column {}".format(*e.position),
                         "not well-formed XML") from None
  unit = document.get("id") or os.path.basename(path)
  for sentence in document.iter("sentence"):
    _read_sentence(path, unit, sentence, portion)


def read(folder: str) -> Portion:
  """The pair records of every ``.xml`` under ``folder``; damaged pairs are left out and counted."""
  if not os.path.isdir(folder):
    raise RawFormatError(folder, "", "expected a folder of DDI corpus .xml files")
  portion = Portion()
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(".xml"):
        _read_document(os.path.join(root, name), portion)
  return portion
