"""DDI Extraction 2013 corpus (XML) → one record per candidate drug pair.

Each file is a ``<document>`` of ``<sentence id text>`` elements holding ``<entity id charOffset
type text>`` (offsets into the sentence text, end inclusive; a discontinuous mention lists several
``a-b`` ranges joined by ``;``) and ``<pair id e1 e2 ddi="true|false" type>`` (type mechanism,
effect, advise or int when ddi is true).

Records: ``{"id": pair id, "sentence", "label"}``: the label is ``DDI-<type>`` or ``DDI-false``;
the sentence has the pair's two mentions replaced by ``@DRUG$``, as the release's prompt describes
its input ("a sentence where the drug is labeled as @DRUG$"); other drug mentions stay as written.
A mention with several ranges is replaced from its first character to its last. Every ``.xml``
under the given folder is read (the release's ``Train/`` or ``Test/...`` folders, DrugBank and
MedLine alike); the split unit is the document.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from medllama_jax.eval import scorers
from medllama_jax.eval.raw.common import Portion, RawFormatError

DRUG_MARK = "@DRUG$"
_TYPES = tuple(label.removeprefix("DDI-") for label in scorers.DDI_LABELS if label != "DDI-false")


def _span(path: str, entity: ET.Element, text: str) -> tuple[int, int]:
  """The entity's [start, end) in the sentence text, checked against the text's length."""
  where = f"entity {entity.get('id')}"
  try:
    ranges = [tuple(int(x) for x in piece.split("-")) for piece in
              entity.attrib["charOffset"].split(";")]
  except (KeyError, ValueError):
    raise RawFormatError(path, where, f"field charOffset {entity.get('charOffset')!r} is not "
                         "a-b[;c-d]") from None
  start, end = ranges[0][0], ranges[-1][-1] + 1
  if any(len(r) != 2 or not 0 <= r[0] <= r[1] < len(text) for r in ranges):
    raise RawFormatError(path, where, f"charOffset {entity.attrib['charOffset']} outside its "
                         f"sentence ({len(text)} characters)")
  if len(ranges) == 1 and text[start:end] != entity.get("text"):
    raise RawFormatError(path, where, "field text differs from the sentence at charOffset")
  return start, end


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


def _read_document(path: str, portion: Portion) -> None:
  try:
    document = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise RawFormatError(path, "line {}, column {}".format(*e.position),
                         "not well-formed XML") from None
  unit = document.get("id") or os.path.basename(path)
  for sentence in document.iter("sentence"):
    text = sentence.get("text")
    if text is None:
      raise RawFormatError(path, f"sentence {sentence.get('id')}", "no text attribute")
    spans = {entity.get("id"): _span(path, entity, text) for entity in sentence.iter("entity")}
    for pair in sentence.iter("pair"):
      where = f"pair {pair.get('id')}"
      missing = [pair.get(k) for k in ("e1", "e2") if pair.get(k) not in spans]
      if missing:
        raise RawFormatError(path, where, f"fields e1/e2 name {missing}, not an entity of "
                             f"sentence {sentence.get('id')}")
      (s1, e1), (s2, e2) = sorted([spans[pair.get("e1")], spans[pair.get("e2")]])
      if s2 < e1:
        raise RawFormatError(path, where, "its two mentions overlap")
      marked = f"{text[:s1]}{DRUG_MARK}{text[e1:s2]}{DRUG_MARK}{text[e2:]}"
      portion.units.append((unit, {"id": pair.get("id"), "sentence": marked,
                                   "label": _label(path, pair)}))


def read(folder: str) -> Portion:
  if not os.path.isdir(folder):
    raise RawFormatError(folder, "", "expected a folder of DDI corpus .xml files")
  portion = Portion()
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(".xml"):
        _read_document(os.path.join(root, name), portion)
  return portion
