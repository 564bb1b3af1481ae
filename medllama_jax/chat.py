r"""Chat templates: a :class:`~medllama_jax.data.instruct.Conversation` → token ids and loss
weights.

Instruction tuning and ``medllama-generate --chat`` must put the same tokens before an answer, so
both render through this module: :func:`render` for training, :func:`render_prompt` for generation.

The default template, ``"medllama"``, is the wrapper of the Me-LLaMA release's evaluation code, the
only trace of how its "-chat" models were prompted (their training template was never published).
With it, models tuned here and the released "-chat" checkpoints are prompted with the same text (the
ids differ at piece boundaries; see the tokenization rule below). Rendered, as Python string
pieces, with ``<s>``/``</s>`` the BOS/EOS ids and ``[...]`` present only with a system turn::

  <s> ["{system}\n\n"]
  "Human: \n{user 1}\n\nAssistant: \n{answer 1}" </s>
  "Human: \n{user 2}\n\nAssistant: \n{answer 2}" </s> ...

One exchange without a system turn is exactly the release's wrapper,
``"Human: \n{prompt}\n\nAssistant: \n"``; system turns and further exchanges are this project's
extension (system text first, then a blank line; each answer closed by EOS, the next ``Human:``
right after it). A user turn's ``context`` (the ``input``/``context`` of single-turn records)
follows its text after a blank line, ``"{text}\n\n{context}"``, in templates without a ``{context}``
slot.

Named templates (:data:`TEMPLATES`), the published ones verbatim:

* ``medllama``: the above (system turns, any number of exchanges);
* ``release_human_assistant``: the release's wrapper as published, one exchange, no system turn;
* ``alpaca_medinstruct``, the release's per-source prompt of Alpaca, Dolly and MedInstruct (one
  exchange)::

    "Below is an input that describes a task, maybe paired with a context that provides further "
    "information. Write a response that appropriately completes the request.\nINPUT: {text} "
    "\nCONTEXT: {context}\nOUTPUT:"

* ``healthcaremagic``, that of HealthCareMagic and iCliniq (one exchange)::

    "Given a medical query, provide a concise and clear answer based on the patient's "
    "description.\nINPUT: {text}\nOUTPUT:"

:meth:`ChatTemplate.wrap` nests a per-source prompt inside a chat wrapper, which is how the
instruction tasks render their sources' single-turn records; ``medllama`` around
``healthcaremagic``::

    "Human: \nGiven a medical query, provide a concise and clear answer based on the patient's "
    "description.\nINPUT: {text}\nOUTPUT:\n\nAssistant: \n"

Loss weights: 1 on every answer token and on the EOS that closes each answer; 0 on BOS, template
text, system and user text (``loss_weights[i]`` weighs the prediction of token ``i``, as in
``LlamaFeatureConverter``).

Tokenization rule: the rendered text is cut into pieces at its slots (template text, each turn's
text, the context; turn texts stripped of surrounding whitespace, template text next to an empty
slot merged into one piece, no piece spanning two exchanges) and every piece is encoded on its own,
without BOS/EOS; the ids are concatenated after the tokenizer's prefix (one BOS for LLaMA; none for
a GPT-2-style tokenizer), with an EOS after each answer. A prompt's
ids thus never depend on its answer, and ``render(conversation)`` is exactly
``render_prompt(conversation without its last answer)`` + the answer's ids + EOS. SentencePiece
(LLaMA: ``add_dummy_prefix``) begins each piece with its word-start ``▁``, so the ids differ from
those of the whole text tokenized at once, and decode to the text with a space at each piece
boundary: prompts for a model tuned this way must come from :func:`render_prompt`.
"""

from __future__ import annotations

import dataclasses
import enum
import string
from collections.abc import Mapping, Sequence
from typing import Protocol

from medllama_jax.data.instruct import ASSISTANT, USER, Conversation, InvalidConversation
from medllama_jax.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "medllama"
_SLOTS = ("text", "context")


class Kind(enum.IntEnum):
  """What a piece of the rendering is: decides its loss weight and how an over-long one is cut."""

  TEMPLATE = 0  # template text (and BOS): weight 0, never cut
  PROMPT = 1  # system, user and context text: weight 0, cut from the left first
  ANSWER = 2  # assistant text (+ EOS): weight 1, its tail cut only when it alone is too long


@dataclasses.dataclass(frozen=True)
class Segment:
  """One separately encoded piece. ``exchange``: 0 for the system preamble, ``k`` for the ``k``-th
  user turn and the answer to it."""

  text: str
  kind: Kind
  exchange: int


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """``turn``: a user turn's prompt, with a ``{text}`` slot (and optionally ``{context}``), which
  the answer follows; ``system``: the preamble of a system turn (``{text}`` slot), None if the
  template has none; ``multi_turn``: whether more than one exchange is allowed."""

  name: str
  turn: str
  system: str | None = None
  multi_turn: bool = True

  def __post_init__(self) -> None:
    for fmt in (self.turn, self.system or "{text}"):
      fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
      if "text" not in fields or not set(fields) <= set(_SLOTS):
        raise ValueError(f"template {self.name!r}: {fmt!r} needs a {{text}} slot and no slots but "
                         f"{_SLOTS}")

  def wrap(self, inner: ChatTemplate) -> ChatTemplate:
    """``inner``'s prompt in this ``{text}`` slot (a per-source prompt in a chat wrapper)."""
    if inner.multi_turn or inner.system is not None:
      raise ValueError(f"only a single-turn template without system turns can be wrapped, not "
                       f"{inner.name!r}")
    return ChatTemplate(f"{self.name}+{inner.name}", self.turn.replace("{text}", inner.turn),
                        self.system, multi_turn=False)


HUMAN_ASSISTANT = "Human: \n{text}\n\nAssistant: \n"
ALPACA_MEDINSTRUCT = (
    "Below is an input that describes a task, maybe paired with a context that provides further "
    "information. Write a response that appropriately completes the request.\nINPUT: {text} "
    "\nCONTEXT: {context}\nOUTPUT:")
HEALTHCAREMAGIC = (
    "Given a medical query, provide a concise and clear answer based on the patient's "
    "description.\nINPUT: {text}\nOUTPUT:")

TEMPLATES: Mapping[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate(DEFAULT_TEMPLATE, HUMAN_ASSISTANT, system="{text}\n\n"),
    ChatTemplate("release_human_assistant", HUMAN_ASSISTANT, multi_turn=False),
    ChatTemplate("alpaca_medinstruct", ALPACA_MEDINSTRUCT, multi_turn=False),
    ChatTemplate("healthcaremagic", HEALTHCAREMAGIC, multi_turn=False),
)}


class Encoder(Protocol):
  """A ``data.vocab.TokenizerVocabulary`` (``encode(text)``) or a ``tokenizer.Tokenizer``
  (``encode(text, add_special_tokens=False)``), with the ids rendering adds: ``prefix_ids``
  (what the tokenizer puts before a text: LLaMA's BOS) and EOS."""

  @property
  def prefix_ids(self) -> tuple[int, ...]: ...

  @property
  def eos_id(self) -> int | None: ...


def get_template(template: str | ChatTemplate) -> ChatTemplate:
  if isinstance(template, ChatTemplate):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[template]


def _pieces(fmt: str, values: Mapping[str, str], exchange: int) -> list[Segment]:
  """``fmt`` split at its slots; empty slots dropped, the template text around them merged."""
  pieces: list[Segment] = []

  def add(text: str, kind: Kind) -> None:
    if pieces and kind == pieces[-1].kind == Kind.TEMPLATE:
      pieces[-1] = Segment(pieces[-1].text + text, kind, exchange)
    elif text:
      pieces.append(Segment(text, kind, exchange))

  for literal, field, _, _ in string.Formatter().parse(fmt):
    add(literal, Kind.TEMPLATE)
    if field is not None:
      add(values[field], Kind.PROMPT)
  return pieces


def segments(conversation: Conversation, template: str | ChatTemplate = DEFAULT_TEMPLATE
             ) -> list[Segment]:
  """The pieces of ``conversation`` in ``template`` (module docstring), in order, without BOS/EOS.

  Raises :class:`InvalidConversation` when the template cannot hold the conversation (a system turn,
  or several exchanges, in a template without them).
  """
  template = get_template(template)
  system = conversation.system
  if system is not None and template.system is None:
    raise InvalidConversation("template_has_no_system_turn", template.name)
  dialogue = conversation.dialogue
  if not template.multi_turn and len(dialogue) > 2:
    raise InvalidConversation("template_is_single_turn", template.name)
  out = [] if system is None else _pieces(template.system, {"text": system.strip()}, 0)
  for index, turn in enumerate(dialogue):
    exchange = index // 2 + 1
    if turn.role == ASSISTANT:
      out.append(Segment(turn.text.strip(), Kind.ANSWER, exchange))
      continue
    context = conversation.context.strip() if exchange == 1 else ""
    fmt = template.turn
    if context and "{context}" not in fmt:
      fmt = fmt.replace("{text}", "{text}\n\n{context}")
    out += _pieces(fmt, {"text": turn.text.strip(), "context": context}, exchange)
  return out


def _encode(encoder: Encoder, text: str) -> list[int]:
  if isinstance(encoder, Tokenizer):
    return encoder.encode(text, add_special_tokens=False)
  return list(encoder.encode(text))


def encode_segments(pieces: Sequence[Segment], encoder: Encoder) -> tuple[list[int], list[float]]:
  """``(token_ids, loss_weights)``: the tokenizer's prefix (BOS where it adds one), each piece
  encoded on its own, EOS after each answer; weight 1 on answer tokens and their EOS, 0 elsewhere."""
  if encoder.eos_id is None:
    raise ValueError("chat rendering needs a tokenizer with an EOS token")
  ids = list(encoder.prefix_ids)
  weights = [0.0] * len(ids)
  for piece in pieces:
    piece_ids = _encode(encoder, piece.text)
    if piece.kind == Kind.ANSWER:
      piece_ids.append(encoder.eos_id)
    ids += piece_ids
    weights += [float(piece.kind == Kind.ANSWER)] * len(piece_ids)
  return ids, weights


def render(conversation: Conversation, encoder: Encoder,
           template: str | ChatTemplate = DEFAULT_TEMPLATE) -> tuple[list[int], list[float]]:
  """Training example: ``(token_ids, loss_weights)`` of a conversation ending with an answer."""
  conversation.check_trainable()
  return encode_segments(segments(conversation, template), encoder)


def render_prompt(conversation: Conversation, encoder: Encoder,
                  template: str | ChatTemplate = DEFAULT_TEMPLATE) -> list[int]:
  """Generation prompt: the ids a model tuned with ``template`` saw before the answer to the last
  (user) turn of ``conversation``."""
  if conversation.turns[-1].role != USER:
    raise ValueError("render_prompt takes a conversation that ends with a user turn")
  return encode_segments(segments(conversation, template), encoder)[0]
