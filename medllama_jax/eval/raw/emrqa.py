"""emrQA's generated ``data.json`` (or one challenge's ``*-qa.json``) → SQuAD json paragraphs.

emrQA's generation scripts write ``{"data": [{"title", "paragraphs": [{"note_id", "context",
"qas": [{"question", "id", "answers": [{"text", "answer_start": [line, token], "evidence",
"evidence_start"}]}]}]}]}``: the context is the note as a list of lines (or one string), a question
is a list of paraphrases, and an answer names a concept (``text``) and the note line that holds it
(``evidence``, at line ``answer_start[0]``, counted from 1). That is not SQuAD: the reader
(``datasets._read_emrqa``) takes ``answers: [{"text", "answer_start": character offset}]``.

Paragraph records (ours): the context is the note's lines joined by newlines; each question keeps
its first paraphrase and, as answers, the distinct evidence lines with their character offsets:
the paper's SQuAD version, where the answer is the line holding the concept. An evidence line is
looked for from the start of its ``answer_start`` line, then anywhere in the note; one found
nowhere is an error. Questions without any evidence line are left out and counted. The split unit
is the note.

Complex answers (``answer_entity_type: "complex"``, e.g. a medication with its dosage) carry lists:
``text`` and ``evidence`` one entry per part, ``evidence_start`` the parts' lines (and
``answer_start`` their ``[lines, tokens]``). Each distinct evidence line of the parts becomes a
SQuAD answer of its own, in order, as emrQA's ``combine_data/squad_format.py`` prepares them: the
parts are not joined, since their lines need not be adjacent and a SQuAD answer is one span of the
context (the first answer, the gold, is the first part's line).

One malformed question, note or article does not stop the conversion: it is logged (file, note
id, question, field at fault), left out and counted in the summary (``malformed_questions``,
``malformed_notes``, ``malformed_articles``). Only a file that is not emrQA's layout at all stops it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from medllama_jax.eval.raw.common import Portion, Record, RawFormatError, read_text


def _lines(path: str, where: str, context: Any) -> list[str]:
  if isinstance(context, str):
    return context.split("\n")
  if isinstance(context, list) and all(isinstance(line, str) for line in context):
    return [line.rstrip("\n") for line in context]
  raise RawFormatError(path, where, "field context is neither text nor a list of lines")


def _evidence_answer(path: str, where: str, context: str, line_starts: list[int], evidence: str,
                     field: str, line: Any) -> dict[str, Any]:
  """The SQuAD answer of one evidence line that ``field`` places at note line ``line`` (from 1)."""
  if not isinstance(line, int):
    raise RawFormatError(path, where, f"field {field}: line {line!r} is not an integer")
  if not 1 <= line <= len(line_starts):
    raise RawFormatError(path, where, f"{field} line {line} outside the note's "
                         f"{len(line_starts)} lines")
  offset = context.find(evidence, line_starts[line - 1])
  offset = offset if offset >= 0 else context.find(evidence)
  if offset < 0:
    raise RawFormatError(path, where, "field evidence does not occur in the note")
  return {"text": evidence, "answer_start": offset}


def _complex_lines(path: str, where: str, answer: Mapping[str, Any],
                   parts: Sequence[Any]) -> tuple[str, list[Any]]:
  """The field and note line of each part of a complex answer: ``evidence_start`` (what emrQA's
  own SQuAD preparation reads), else the lines of ``answer_start`` (``[lines, tokens]``)."""
  start = answer.get("answer_start")
  start_lines = start[0] if isinstance(start, list) and start else None
  for field, lines in (("evidence_start", answer.get("evidence_start")),
                       ("answer_start", start_lines)):
    if isinstance(lines, list) and len(lines) == len(parts):
      return field, lines
  raise RawFormatError(path, where, f"a complex answer's evidence_start (or answer_start lines) "
                       f"does not give a line for each of its {len(parts)} evidence parts")


def _answers(path: str, where: str, context: str, line_starts: list[int],
             answer: Any) -> list[dict[str, Any]]:
  """The SQuAD answers (evidence line, offset) of one emrQA answer: one for a single answer, one
  per part for a complex one, none without evidence."""
  evidence = answer.get("evidence", "") if isinstance(answer, dict) else None
  if isinstance(evidence, list) and all(isinstance(part, str) for part in evidence):
    field, lines = _complex_lines(path, where, answer, evidence)
    return [_evidence_answer(path, where, context, line_starts, part.strip(), field, line)
            for part, line in zip(evidence, lines) if part.strip()]
  if not isinstance(evidence, str):
    raise RawFormatError(path, where, "an answer whose field evidence is neither text nor a list "
                         "of texts")
  if not evidence.strip():
    return []
  start = answer.get("answer_start")
  if not (isinstance(start, list) and start and isinstance(start[0], int)):
    raise RawFormatError(path, where, f"field answer_start {start!r} is not [line, token]")
  return [_evidence_answer(path, where, context, line_starts, evidence.strip(), "answer_start",
                           start[0])]


def _question(path: str, at: str, context: str, line_starts: list[int],
              qa: Any) -> tuple[str, list[dict[str, Any]]]:
  """A question's first paraphrase and its distinct SQuAD answers, in order."""
  question = qa.get("question") if isinstance(qa, dict) else None
  question = question[0] if isinstance(question, list) and question else question
  if not isinstance(question, str) or not isinstance(qa.get("answers"), list):
    raise RawFormatError(path, at, "fields question (text or paraphrases) and answers needed")
  answers: list[dict[str, Any]] = []
  for answer in qa["answers"]:
    for found in _answers(path, at, context, line_starts, answer):
      if found not in answers:
        answers.append(found)
  return question, answers


def _paragraph(path: str, title: str, index: int, paragraph: Any,
               portion: Portion) -> tuple[str, Record]:
  note = str(paragraph.get("note_id", index)) if isinstance(paragraph, dict) else str(index)
  where = f"{title!r} note {note}"
  if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
    raise RawFormatError(path, where, "a paragraph without a list field qas")
  lines = _lines(path, where, paragraph.get("context"))
  context = "\n".join(lines)
  line_starts = [0]
  for line in lines[:-1]:
    line_starts.append(line_starts[-1] + len(line) + 1)
  qas = []
  for k, qa in enumerate(paragraph["qas"]):
    try:
      question, answers = _question(path, f"{where}, question {k}", context, line_starts, qa)
    except RawFormatError as error:
      portion.leave_out("emrQA", "question", error)
      continue
    if answers:
      qas.append({"id": f"{title}:{note}:{k}", "question": question, "answers": answers})
    else:
      portion.skipped["questions_without_evidence"] += 1
  return f"{title}:{note}", {"title": title, "note_id": note, "context": context, "qas": qas}


def read(path: str) -> Portion:
  """The paragraph records of one emrQA json file; malformed pieces are left out and counted."""
  try:
    data = json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise RawFormatError(path, f"line {e.lineno}, column {e.colno}", "not JSON") from None
  articles = data.get("data") if isinstance(data, dict) else None
  if not isinstance(articles, list):
    raise RawFormatError(path, "", "no list field data (emrQA's data.json layout)")
  portion = Portion()
  for article in articles:
    title = str(article.get("title", "")) if isinstance(article, dict) else ""
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
      portion.leave_out("emrQA", "article",
                        RawFormatError(path, f"article {title!r}", "no list field paragraphs"))
      continue
    for index, paragraph in enumerate(article["paragraphs"]):
      try:
        unit, record = _paragraph(path, title, index, paragraph, portion)
      except RawFormatError as error:
        portion.leave_out("emrQA", "note", error)
        continue
      if record["qas"]:
        portion.units.append((unit, record))
      else:
        portion.skipped["notes_without_questions"] += 1
  return portion
