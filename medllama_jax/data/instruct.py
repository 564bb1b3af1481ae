"""Instruction-tuning records: either shape the data comes in, read into one conversation format.

Me-LLaMA's "-chat" models were tuned on ~214k samples from 15 sources. Its release stores them
FastChat/ShareGPT style::

  {"id": ..., "conversations": [{"from": "human", "value": prompt},
                                {"from": "agent", "value": answer}]}

while the source datasets themselves (Alpaca, Dolly, MedInstruct, ...) ship single-turn records
``{"instruction", "input" or "context", "output"}``. Both become a :class:`Conversation`: an
optional system turn, then user and assistant turns alternating, user first.

Record formats (texts are stripped of surrounding whitespace and must not be empty):

* multi-turn: ``conversations``, a list of ``{"from": role, "value": text}``; roles
  ``human``/``user`` → user, ``agent``/``gpt``/``assistant`` → assistant, ``system`` (first turn
  only).
* single-turn: ``instruction``, optional ``input`` or ``context`` (not both; kept apart as the
  conversation's :attr:`Conversation.context`, for the per-source prompt formats that have a slot
  for it), ``output``.
* optional ``id`` (string or integer) in both. A null field counts as absent (a Parquet file has
  every column in every row).

A training record must end with an assistant turn. Files: ``.jsonl`` (one record per line, streamed;
blank lines are skipped), ``.json`` (a list of records) and ``.parquet`` (read in row batches; needs
pyarrow). Paths may be local or URLs (``gs://...``; through ``tf.io.gfile``, and pyarrow's file
systems for Parquet).

A malformed record (bad JSON, no assistant turn, an unknown role, turns out of order, empty text,
...) is skipped and handed to :class:`Rejections`, which counts it by reason and logs the file and
its line/index/row, never its text: instruction sets built from MIMIC notes are credentialed data.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
ROLE_ALIASES: Mapping[str, str] = {
    "system": SYSTEM, "human": USER, "user": USER, "agent": ASSISTANT, "gpt": ASSISTANT,
    "assistant": ASSISTANT}
# Record formats, as Conversation.record_format.
INSTRUCTION_FORMAT, CONVERSATIONS_FORMAT = "instruction", "conversations"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
LOGGED_PER_REASON = 100
PARQUET_BATCH_ROWS = 1024


class InvalidConversation(ValueError):
  """A record (or a conversation for a template) that cannot be used; ``reason`` is a short key."""

  def __init__(self, reason: str, detail: str = "") -> None:
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str
  text: str


@dataclasses.dataclass(frozen=True)
class Conversation:
  """An optional system turn, then user and assistant turns alternating, user first (checked).

  A conversation to train on ends with an assistant turn (:meth:`check_trainable`); one to generate
  from ends with a user turn. ``context`` belongs to the first user turn (single-turn records' input
  or context). ``record_format`` says which record shape it came from (the per-source prompt formats
  apply to single-turn records only).
  """

  turns: tuple[Turn, ...]
  context: str = ""
  id: str | None = None
  record_format: str = CONVERSATIONS_FORMAT

  def __post_init__(self) -> None:
    turns = self.turns
    for turn in turns:
      if turn.role not in ROLES:
        raise InvalidConversation("unknown_role", repr(turn.role))
      if not isinstance(turn.text, str):
        raise InvalidConversation("bad_field_type",
                                  f"{turn.role} text is {type(turn.text).__name__}")
      if not turn.text.strip():
        raise InvalidConversation("empty_text", f"{turn.role} turn")
    if any(t.role == SYSTEM for t in turns[1:]):
      raise InvalidConversation("system_not_first")
    dialogue = turns[1:] if turns and turns[0].role == SYSTEM else turns
    if not dialogue:
      raise InvalidConversation("no_user_turn")
    expected = [(USER, ASSISTANT)[i % 2] for i in range(len(dialogue))]
    if [t.role for t in dialogue] != expected:
      raise InvalidConversation("not_alternating", "turns must go user, assistant, user, ...")

  @property
  def system(self) -> str | None:
    return self.turns[0].text if self.turns[0].role == SYSTEM else None

  @property
  def dialogue(self) -> tuple[Turn, ...]:
    """The user and assistant turns."""
    return self.turns[1:] if self.system is not None else self.turns

  def check_trainable(self) -> None:
    """Raises unless the conversation ends with an assistant turn (the answer to learn)."""
    if self.turns[-1].role != ASSISTANT:
      has_answer = any(t.role == ASSISTANT for t in self.turns)
      raise InvalidConversation("ends_with_user_turn" if has_answer else "no_assistant_turn")


def _gfile() -> Any:
  """``tf.io.gfile`` (local paths and ``gs://`` URLs), imported on first use: generation renders
  conversations with this module's classes and does not otherwise load TensorFlow."""
  import tensorflow as tf
  return tf.io.gfile


def _text(record: Mapping[str, Any], key: str) -> str:
  value = record.get(key)
  if value is None:
    raise InvalidConversation("missing_field", key)
  if not isinstance(value, str):
    raise InvalidConversation("bad_field_type", f"{key} is {type(value).__name__}")
  return value.strip()


def _record_id(record: Mapping[str, Any]) -> str | None:
  value = record.get("id")
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  raise InvalidConversation("bad_field_type", f"id is {type(value).__name__}")


def _multi_turn(record: Mapping[str, Any]) -> Conversation:
  messages = record["conversations"]
  if not isinstance(messages, list):
    raise InvalidConversation("bad_field_type", f"conversations is {type(messages).__name__}")
  turns = []
  for message in messages:
    if not isinstance(message, Mapping):
      raise InvalidConversation("bad_field_type", f"a turn is {type(message).__name__}")
    role = message.get("from")
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
      raise InvalidConversation("unknown_role", repr(role))
    turns.append(Turn(ROLE_ALIASES[role.lower()], _text(message, "value")))
  return Conversation(tuple(turns), id=_record_id(record), record_format=CONVERSATIONS_FORMAT)


def _single_turn(record: Mapping[str, Any]) -> Conversation:
  contexts = [c for c in (_text(record, key) for key in ("input", "context") if key in record) if c]
  if len(contexts) > 1:
    raise InvalidConversation("input_and_context", "give one of input and context")
  turns = (Turn(USER, _text(record, "instruction")), Turn(ASSISTANT, _text(record, "output")))
  return Conversation(turns, context=contexts[0] if contexts else "", id=_record_id(record),
                      record_format=INSTRUCTION_FORMAT)


def parse_record(record: Any) -> Conversation:
  """The trainable :class:`Conversation` of one record (module docstring); raises
  :class:`InvalidConversation` with the reason it cannot be used."""
  if not isinstance(record, Mapping):
    raise InvalidConversation("not_an_object", type(record).__name__)
  record = {k: v for k, v in record.items() if v is not None}  # null = absent (Parquet columns)
  if "conversations" in record:
    conversation = _multi_turn(record)
  elif "instruction" in record:
    conversation = _single_turn(record)
  else:
    raise InvalidConversation("unknown_format", "expected conversations, or instruction and output")
  conversation.check_trainable()
  return conversation


class Rejections:
  """Counts skipped records by reason; logs the first :data:`LOGGED_PER_REASON` of each by place."""

  def __init__(self) -> None:
    self.counts: collections.Counter[str] = collections.Counter()

  def add(self, path: str, location: str, reason: str) -> None:
    self.counts[reason] += 1
    seen = self.counts[reason]
    if seen <= LOGGED_PER_REASON:
      logging.warning("skipped the record at %s %s: %s", path, location, reason)
    if seen == LOGGED_PER_REASON:
      logging.warning("%d records skipped as %r; further ones are counted, not logged", seen,
                      reason)

  @property
  def total(self) -> int:
    return sum(self.counts.values())


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
  """(``line N``, parsed JSON, or an :class:`InvalidConversation` for a line that is not JSON)."""
  with _gfile().GFile(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      location = f"line {number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        yield location, InvalidConversation("bad_utf8")
        continue
      if not line.strip():
        continue
      try:
        yield location, json.loads(line)
      except json.JSONDecodeError:
        yield location, InvalidConversation("bad_json")


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
  with _gfile().GFile(path, "rb") as f:
    try:
      records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not a JSON file ({type(e).__name__} at "
                       f"{_error_place(e)})") from None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
  for index, record in enumerate(records):
    yield f"index {index}", record


def _error_place(error: Exception) -> str:
  """Where a decoding error is, without the text around it."""
  if isinstance(error, json.JSONDecodeError):
    return f"line {error.lineno} column {error.colno}"
  return f"byte {getattr(error, 'start', '?')}"


def _parquet_records(path: str) -> Iterator[tuple[str, Any]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or convert the file to "
                      ".jsonl") from None
  with pq.ParquetFile(path) as parquet:  # pyarrow's own file systems: local, gs://, s3://, ...
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
      for record in batch.to_pylist():
        yield f"row {row}", record
        row += 1


_READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}


def read_conversations(path: str, rejections: Rejections | None = None
                       ) -> Iterator[tuple[str, Conversation]]:
  """Streams ``(location, conversation)`` for the usable records of a jsonl, json or parquet file.

  ``location`` is ``line N`` (1-based), ``index N`` or ``row N`` (0-based). Malformed records are
  skipped into ``rejections`` (a fresh one, logged, if not given). A file that cannot be read as a
  whole (missing, not JSON, an unknown suffix) raises.
  """
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _READERS:
    raise ValueError(f"{path}: instruction data must be one of {', '.join(FILE_SUFFIXES)}")
  if not _gfile().exists(path):
    raise FileNotFoundError(f"no instruction data file {path}")
  rejections = Rejections() if rejections is None else rejections
  for location, record in _READERS[suffix](path):
    try:
      if isinstance(record, InvalidConversation):
        raise record
      yield location, parse_record(record)
    except InvalidConversation as e:
      rejections.add(path, location, e.reason)
