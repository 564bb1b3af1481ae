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
"""

from __future__ import annotations

import json
from typing import Any

from medllama_jax.eval.raw.common import Portion, Record, RawFormatError, read_text


def _lines(path: str, where: str, context: Any) -> list[str]:
  if isinstance(context, str):
    return context.split("\n")
  if isinstance(context, list) and all(isinstance(line, str) for line in context):
    return [line.rstrip("\n") for line in context]
  raise RawFormatError(path, where, "field context is neither text nor a list of lines")


def _answer(path: str, where: str, context: str, line_starts: list[int],
            answer: Any) -> dict[str, Any] | None:
  """The SQuAD answer (evidence line, offset) of one emrQA answer; None if it has no evidence."""
  if not isinstance(answer, dict) or not isinstance(answer.get("evidence", ""), str):
    raise RawFormatError(path, where, "an answer whose field evidence is not text")
  evidence = answer.get("evidence", "").strip()
  if not evidence:
    return None
  start = answer.get("answer_start")
  if not (isinstance(start, list) and start and isinstance(start[0], int)):
    raise RawFormatError(path, where, f"field answer_start {start!r} is not [line, token]")
  if not 1 <= start[0] <= len(line_starts):
    raise RawFormatError(path, where, f"answer_start line {start[0]} outside the note's "
                         f"{len(line_starts)} lines")
  offset = context.find(evidence, line_starts[start[0] - 1])
  offset = offset if offset >= 0 else context.find(evidence)
  if offset < 0:
    raise RawFormatError(path, where, "field evidence does not occur in the note")
  return {"text": evidence, "answer_start": offset}


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
    at = f"{where}, question {k}"
    question = qa.get("question") if isinstance(qa, dict) else None
    question = question[0] if isinstance(question, list) and question else question
    if not isinstance(question, str) or not isinstance(qa.get("answers"), list):
      raise RawFormatError(path, at, "fields question (text or paraphrases) and answers needed")
    answers = []
    for answer in qa["answers"]:
      found = _answer(path, at, context, line_starts, answer)
      if found is not None and found not in answers:
        answers.append(found)
    if answers:
      qas.append({"id": f"{title}:{note}:{k}", "question": question, "answers": answers})
    else:
      portion.skipped["questions_without_evidence"] += 1
  return f"{title}:{note}", {"title": title, "note_id": note, "context": context, "qas": qas}


def read(path: str) -> Portion:
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
      raise RawFormatError(path, f"article {title!r}", "no list field paragraphs")
    for index, paragraph in enumerate(article["paragraphs"]):
      unit, record = _paragraph(path, title, index, paragraph, portion)
      if record["qas"]:
        portion.units.append((unit, record))
      else:
        portion.skipped["notes_without_questions"] += 1
  return portion
