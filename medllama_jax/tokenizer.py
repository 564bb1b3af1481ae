"""Tokenizers of model folders, encoding text exactly as ``transformers.AutoTokenizer`` does.

A model folder carries its tokenizer in Hugging Face's files: ``tokenizer.json`` (the ``tokenizers``
pipeline: normalizer, pre-tokenizer, model, post-processor, added tokens), ``tokenizer_config.json``
(the tokenizer class, special-token names, ``add_bos_token`` / ``add_eos_token``) and, for LLaMA 1/2
and Meta's own release, a SentencePiece ``tokenizer.model``. The ids a model was trained on are the
ids its tokenizer's definition gives, so one :class:`Tokenizer` serves generation, evaluation,
training data and chat rendering alike, built from those files by the rules transformers applies
when it loads them:

* ``tokenizer.json`` wins over ``tokenizer.model`` when a folder has both (it is what
  ``AutoTokenizer`` reads). Its pipeline is used as stored, except for the tokenizer classes whose
  pipeline transformers builds in code from the file's vocabulary and merges: ``LlamaTokenizer``
  (no normalizer; a ``Metaspace`` pre-tokenizer that prefixes "▁" to the first piece of text only,
  or to every piece with ``legacy: true``, or never with ``add_prefix_space: false``; byte fallback)
  and ``GPT2Tokenizer`` (byte-level BPE, ``add_prefix_space`` as configured). Any other class is
  taken as stored, with a warning in the log, since transformers may rebuild it differently.
* A bare ``tokenizer.model`` (a SentencePiece BPE model) is read the way ``LlamaTokenizer`` reads
  it: its pieces become the vocabulary, every pair of pieces that joins into a piece becomes a merge
  ranked by the joined piece's id, and its control and user-defined pieces become added tokens.
* BOS and EOS: with a ``tokenizer.json``, its post-processor decides (a LLaMA-3 template adds
  BOS, a GPT-2-style byte-level one adds nothing, none adds nothing); ``add_bos_token`` /
  ``add_eos_token`` in ``tokenizer_config.json`` are then ignored, as transformers ignores them.
  A ``tokenizer.model`` alone gets ``[BOS] text [EOS]`` by those flags, each off unless set, and
  Meta's bare release (no config at all) LLaMA's own convention: BOS and no EOS.
* Special-token strings inside text (``"<s>"``, ``"<|eot_id|>"``) are those special ids, as in
  transformers; chat templates rely on it.

Where LLaMA's SentencePiece library itself differs (text that starts with a space gets one "▁"
rather than two; special-token text; text holding "▁" itself) the ids follow transformers, which is what Me-LLaMA and
LLaMA-family checkpoints on the Hub are used with.

The module can also train a tiny LLaMA-convention SentencePiece model so that tests and the demo
run fully offline, and write the ``tokenizer_config.json`` that makes ``AutoTokenizer`` load it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import sentencepiece as spm
import tokenizers
from absl import logging
from etils import epath
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from medllama_jax import storage

StrPath = str | os.PathLike[str]

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

TOKENIZER_FILES: tuple[str, ...] = (
    SENTENCEPIECE_FILE,
    HF_TOKENIZER_FILE,
    HF_TOKENIZER_CONFIG_FILE,
    HF_SPECIAL_TOKENS_MAP_FILE,
)
"""Tokenizer-related files a model folder may hold; converters carry them along."""

LLAMA_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})
GPT2_CLASSES = frozenset({"GPT2Tokenizer", "GPT2TokenizerFast"})
FILE_AS_STORED_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
"""Classes transformers loads ``tokenizer.json`` for without rebuilding its pipeline."""

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_SP_CONTROL, _SP_USER_DEFINED = 3, 4  # SentencePiece piece types that become added tokens
_SP_BPE = 2  # SentencePiece's TrainerSpec.ModelType.BPE


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
  """What ``tokenizer_config.json`` (over ``special_tokens_map.json``) says about a tokenizer.

  ``None`` means "not stated": the rules of the module docstring then decide.
  """

  tokenizer_class: str | None = None
  special_tokens: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  extra_special_tokens: tuple[str, ...] = ()
  added_tokens: tuple[AddedToken, ...] = ()
  add_bos_token: bool | None = None
  add_eos_token: bool | None = None
  add_prefix_space: bool | None = None
  legacy: bool | None = None
  clean_up_tokenization_spaces: bool = False


class Tokenizer:
  """A ``tokenizers`` pipeline plus the special tokens its folder names.

  ``encode(text)`` equals ``AutoTokenizer(folder)(text).input_ids``; ``prefix_ids`` / ``suffix_ids``
  are what it puts around the text (``[BOS]`` and nothing for LLaMA), so code that assembles ids
  from separately encoded pieces (chat turns, prompt and answer, documents) adds the same.
  Special-token ids are ``None`` when the tokenizer has no such token (LLaMA has no pad token).
  """

  def __init__(self, backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str | None],
               clean_up_tokenization_spaces: bool = False, source: str = "") -> None:
    self._backend = backend
    self.source = source
    self.special_tokens = dict(special_tokens)
    self._ids = {name: self._token_id(self.special_tokens.get(name)) for name in _SPECIAL_NAMES}
    self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)
    self.prefix_ids, self.suffix_ids = self._affixes()

  def _token_id(self, token: str | None) -> int | None:
    if token is None:
      return None
    token_id = self._backend.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{self.source}: special token {token!r} is not in the vocabulary")
    return token_id

  def _affixes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the post-processor adds before and after a text, found by encoding a probe."""
    plain = self.encode("a", add_special_tokens=False)
    full = self.encode("a")
    for start in range(len(full) - len(plain) + 1):
      if full[start:start + len(plain)] == plain:
        return tuple(full[:start]), tuple(full[start + len(plain):])
    raise ValueError(f"{self.source}: the post-processor changes the text's own ids ({plain} → "
                     f"{full}); only templates that add tokens around the text are supported")

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of ``text``; with ``add_special_tokens`` the tokenizer's own BOS/EOS around them."""
    return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """:meth:`encode` of each text, in one call into the (multi-threaded) tokenizer."""
    return [list(e.ids) for e in self._backend.encode_batch(list(texts),
                                                            add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids`` as ``AutoTokenizer.decode`` gives it; special tokens dropped by default."""
    text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    return _clean_up_tokenization(text) if self._clean_up else text

  def id_to_token(self, token_id: int) -> str | None:
    """Surface string of a vocabulary entry, e.g. ``"<s>"`` for LLaMA's BOS."""
    return self._backend.id_to_token(token_id)

  def to_str(self) -> str:
    """The whole pipeline as ``tokenizer.json`` text (what this tokenizer encodes with)."""
    return self._backend.to_str()

  @property
  def bos_id(self) -> int | None:
    return self._ids["bos_token"]

  @property
  def eos_id(self) -> int | None:
    return self._ids["eos_token"]

  @property
  def pad_id(self) -> int | None:
    return self._ids["pad_token"]

  @property
  def unk_id(self) -> int | None:
    return self._ids["unk_token"]

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce, added tokens included."""
    return self._backend.get_vocab_size(with_added_tokens=True)


def _clean_up_tokenization(text: str) -> str:
  """transformers' ``clean_up_tokenization_spaces`` (applied to non-BPE tokenizers only)."""
  for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
    text = text.replace(spaced, joined)
  return text


def _token_content(value: Any) -> str | None:
  """HF configs store a special token either as a string or as an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _added_token(fields: Mapping[str, Any]) -> AddedToken:
  return AddedToken(fields["content"], single_word=fields.get("single_word", False),
                    lstrip=fields.get("lstrip", False), rstrip=fields.get("rstrip", False),
                    normalized=fields.get("normalized", not fields.get("special", False)),
                    special=fields.get("special", False))


def read_settings(model_dir: StrPath) -> TokenizerSettings:
  """:class:`TokenizerSettings` of a folder: ``tokenizer_config.json`` over ``special_tokens_map.json``."""
  merged: dict[str, Any] = {}
  for name in (HF_SPECIAL_TOKENS_MAP_FILE, HF_TOKENIZER_CONFIG_FILE):  # later file wins
    path = epath.Path(model_dir) / name
    if path.is_file():
      try:
        content = json.loads(path.read_text(encoding="utf-8"))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
      merged.update({k: v for k, v in content.items() if v is not None or k in _SPECIAL_NAMES})
  extra = merged.get("extra_special_tokens") or merged.get("additional_special_tokens") or ()
  if isinstance(extra, dict):  # transformers 5 may store named extra tokens
    extra = tuple(extra.values())
  added = sorted((int(i), fields) for i, fields in (merged.get("added_tokens_decoder") or {}).items())
  return TokenizerSettings(
      tokenizer_class=merged.get("tokenizer_class"),
      special_tokens={key: _token_content(merged.get(key)) for key in _SPECIAL_NAMES},
      extra_special_tokens=tuple(_token_content(t) for t in extra),
      added_tokens=tuple(_added_token(fields) for _, fields in added),
      add_bos_token=merged.get("add_bos_token"),
      add_eos_token=merged.get("add_eos_token"),
      add_prefix_space=merged.get("add_prefix_space"),
      legacy=merged.get("legacy"),
      clean_up_tokenization_spaces=bool(merged.get("clean_up_tokenization_spaces", False)),
  )


def _metaspace_scheme(settings: TokenizerSettings) -> str:
  if settings.add_prefix_space is False:
    return "never"
  return "always" if settings.legacy else "first"


def _llama_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]],
                    settings: TokenizerSettings) -> tokenizers.Tokenizer:
  """``LlamaTokenizer``'s pipeline: byte-fallback BPE behind a ``Metaspace`` pre-tokenizer."""
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                            byte_fallback=True, dropout=None))
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁",
                                                   prepend_scheme=_metaspace_scheme(settings),
                                                   split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if settings.add_prefix_space is not False:
    steps.append(decoders.Strip(content=" ", left=1))
  backend.decoder = decoders.Sequence(steps)
  return backend


def _gpt2_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]],
                   settings: TokenizerSettings) -> tokenizers.Tokenizer:
  """``GPT2Tokenizer``'s pipeline: byte-level BPE."""
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                            continuing_subword_prefix="", end_of_word_suffix="",
                                            fuse_unk=False))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.add_prefix_space))
  backend.decoder = decoders.ByteLevel()
  return backend


_CLASS_PIPELINES = {**{name: _llama_pipeline for name in LLAMA_CLASSES},
                    **{name: _gpt2_pipeline for name in GPT2_CLASSES}}


def _bpe_vocab_and_merges(definition: Mapping[str, Any], path: str) -> tuple[dict[str, int],
                                                                           list[tuple[str, str]]]:
  model = definition.get("model") or {}
  if model.get("type") != "BPE":
    raise ValueError(f"{path}: model.type is {model.get('type')!r}; its tokenizer class is built "
                     "on BPE")
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return dict(model["vocab"]), merges


def _from_tokenizer_json(path: str, settings: TokenizerSettings) -> tokenizers.Tokenizer:
  """The stored pipeline, rebuilt where transformers rebuilds it for the folder's class."""
  try:
    stored = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises bare Exception subclasses for malformed files
    raise ValueError(f"{path}: not a tokenizers file ({str(e).splitlines()[0]})") from None
  build = _CLASS_PIPELINES.get(settings.tokenizer_class or "")
  if build is None:
    if settings.tokenizer_class not in FILE_AS_STORED_CLASSES | {None}:
      logging.warning("%s: tokenizer class %s is taken as tokenizer.json stores it; transformers "
                      "may build its pipeline differently", path, settings.tokenizer_class)
    return stored
  with open(path, encoding="utf-8") as f:
    definition = json.load(f)
  backend = build(*_bpe_vocab_and_merges(definition, path), settings)
  backend.post_processor = stored.post_processor
  backend.add_tokens(list(stored.get_added_tokens_decoder().values()))
  return backend


def _sentencepiece_proto(path: str) -> Any:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    try:
      proto.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError
      raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
  return proto


def sentencepiece_merges(pieces: Sequence[str]) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece BPE vocabulary: each split of a piece into two pieces, ranked by
  the joined piece's id, then by the length of its left part."""
  vocab = set(pieces)
  return [(piece[:cut], piece[cut:]) for piece in pieces for cut in range(1, len(piece))
          if piece[:cut] in vocab and piece[cut:] in vocab]


def _from_sentencepiece(path: str, settings: TokenizerSettings
                        ) -> tuple[tokenizers.Tokenizer, dict[str, str | None]]:
  """A SentencePiece BPE model as ``LlamaTokenizer`` reads it; also its own special-token names."""
  proto = _sentencepiece_proto(path)
  if proto.trainer_spec.model_type != _SP_BPE:
    raise ValueError(f"{path}: a SentencePiece model of type {proto.trainer_spec.model_type}; LLaMA "
                     "tokenizers are BPE models (type 2)")
  pieces = [p.piece for p in proto.pieces]
  vocab = {piece: i for i, piece in enumerate(pieces)}
  backend = _llama_pipeline(vocab, sentencepiece_merges(pieces), settings)
  backend.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == _SP_CONTROL)
                      for p in proto.pieces if p.type in (_SP_CONTROL, _SP_USER_DEFINED)])
  spec = proto.trainer_spec
  own = {name: (pieces[i] if 0 <= i < len(pieces) else None)
         for name, i in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                         ("unk_token", spec.unk_id), ("pad_token", spec.pad_id))}
  return backend, own


def _add_named_tokens(backend: tokenizers.Tokenizer, settings: TokenizerSettings,
                      special_tokens: Mapping[str, str | None]) -> None:
  """The config's added tokens and named special tokens become added tokens if they are not yet."""
  present = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
  backend.add_tokens([t for t in settings.added_tokens if t.content not in present])
  present |= {t.content for t in settings.added_tokens}
  named = [t for t in (*special_tokens.values(), *settings.extra_special_tokens) if t is not None]
  backend.add_tokens([AddedToken(t, special=True, normalized=False)
                      for t in dict.fromkeys(named) if t not in present])


def _set_post_processor(backend: tokenizers.Tokenizer, add_bos: bool, add_eos: bool,
                        bos_token: str | None, eos_token: str | None) -> None:
  """``[BOS] $A [EOS]`` by the flags, as transformers writes it for a pipeline without one."""
  add_bos, add_eos = add_bos and bos_token is not None, add_eos and eos_token is not None
  specials = ([(bos_token, backend.token_to_id(bos_token))] if add_bos else []) + (
      [(eos_token, backend.token_to_id(eos_token))] if add_eos else [])
  single = f"{bos_token + ':0 ' if add_bos else ''}$A:0{' ' + eos_token + ':0' if add_eos else ''}"
  pair = (f"{single}{' ' + bos_token + ':1' if add_bos else ''} $B:1"
          f"{' ' + eos_token + ':1' if add_eos else ''}")
  backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                         special_tokens=specials)


def load_tokenizer(model_dir: StrPath) -> Tokenizer:
  """The tokenizer of a model folder (local or remote), by the rules of the module docstring.

  ``model_dir`` may also name a tokenizer file: ``tokenizer.json`` / ``tokenizer.model`` stand for
  their folder; a SentencePiece ``.model`` of another name is read as Meta's bare release.
  """
  named = epath.Path(model_dir)
  if named.is_file():
    if named.name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE):
      return load_tokenizer(named.parent)
    if named.suffix != ".model":
      raise ValueError(f"{os.fspath(model_dir)}: not a tokenizer folder, {HF_TOKENIZER_FILE}, or "
                       "SentencePiece .model file")
    backend, own = _from_sentencepiece(storage.local_copy(named), TokenizerSettings())
    return _finish(backend, TokenizerSettings(), own, True, False, os.fspath(model_dir))
  json_path = epath.Path(model_dir) / HF_TOKENIZER_FILE
  sp_path = epath.Path(model_dir) / SENTENCEPIECE_FILE
  settings = read_settings(model_dir)
  special = dict(settings.special_tokens)
  if json_path.is_file():
    source = os.fspath(json_path)
    backend = _from_tokenizer_json(storage.local_copy(json_path), settings)
    add_bos = add_eos = False
  elif sp_path.is_file():
    source = os.fspath(sp_path)
    backend, own = _from_sentencepiece(storage.local_copy(sp_path), settings)
    if (epath.Path(model_dir) / HF_TOKENIZER_CONFIG_FILE).is_file():
      special = {name: special.get(name) or (own[name] if name != "pad_token" else None)
                 for name in _SPECIAL_NAMES}
      add_bos, add_eos = bool(settings.add_bos_token), bool(settings.add_eos_token)
    else:  # Meta's release: LLaMA's convention (BOS, no EOS) and the model's own pieces
      special, add_bos, add_eos = own, True, False
  else:
    raise FileNotFoundError(f"no tokenizer in {os.fspath(model_dir)!r}: expected "
                            f"{HF_TOKENIZER_FILE!r} or {SENTENCEPIECE_FILE!r}")
  return _finish(backend, settings, special, add_bos, add_eos, source)


def _finish(backend: tokenizers.Tokenizer, settings: TokenizerSettings,
            special: Mapping[str, str | None], add_bos: bool, add_eos: bool,
            source: str) -> Tokenizer:
  """Named tokens added, a post-processor where the pipeline has none, no truncation/padding."""
  _add_named_tokens(backend, settings, special)
  if backend.post_processor is None:
    _set_post_processor(backend, add_bos, add_eos, special.get("bos_token"),
                        special.get("eos_token"))
  backend.no_truncation()
  backend.no_padding()
  return Tokenizer(backend, special, settings.clean_up_tokenization_spaces, source)


def copy_tokenizer_files(src_dir: StrPath, dst_dir: StrPath) -> list[str]:
  """Copy whichever of :data:`TOKENIZER_FILES` exist in ``src_dir``; returns the copied names.

  Converters call this so a converted checkpoint stays usable on its own.
  """
  epath.Path(dst_dir).mkdir(parents=True, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    src = epath.Path(src_dir) / name
    if src.is_file():
      src.copy(epath.Path(dst_dir) / name, overwrite=True)
      copied.append(name)
  return copied


def train_sentencepiece(text_file: StrPath, model_prefix: StrPath, vocab_size: int) -> str:
  """Train a tiny LLaMA-2-convention SentencePiece BPE model; returns the ``.model`` path.

  The options mirror LLaMA 2's trainer spec (byte fallback, split digits, identity normalization,
  whitespace kept verbatim, UNK/BOS/EOS = 0/1/2, no pad) so that code exercised with it behaves as
  with the real tokenizer. Training uses every input line, one thread and no shuffling, so the
  result is deterministic; ``vocab_size`` is a hard limit (training fails rather than silently
  producing a smaller vocabulary).
  """
  model_prefix = os.fspath(model_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      input=os.fspath(text_file),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type="bpe",
      character_coverage=1.0,
      byte_fallback=True,
      split_digits=True,
      add_dummy_prefix=True,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      normalization_rule_name="identity",
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      unk_piece="<unk>",
      bos_piece="<s>",
      eos_piece="</s>",
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )
  return model_prefix + ".model"


def write_hf_tokenizer_config(model_dir: StrPath) -> None:
  """Write ``tokenizer_config.json`` and ``special_tokens_map.json`` beside a ``tokenizer.model``.

  ``transformers.AutoTokenizer`` then loads the folder as a ``LlamaTokenizer`` that adds BOS and
  not EOS (LLaMA's convention, which :func:`load_tokenizer` gives the bare model too), with the
  model's own special pieces; ``legacy: false`` is the modern LLaMA setting.
  """
  sp_path = os.path.join(os.fspath(model_dir), SENTENCEPIECE_FILE)
  if not os.path.isfile(sp_path):
    raise FileNotFoundError(f"no {SENTENCEPIECE_FILE} in {os.fspath(model_dir)!r} to describe")
  _, own = _from_sentencepiece(sp_path, TokenizerSettings())
  special = {name: token for name, token in own.items() if token is not None}
  config = {
      "tokenizer_class": "LlamaTokenizer",
      **special,
      "add_bos_token": True,
      "add_eos_token": False,
      "legacy": False,
      "clean_up_tokenization_spaces": False,
  }
  for name, content in ((HF_TOKENIZER_CONFIG_FILE, config), (HF_SPECIAL_TOKENS_MAP_FILE, special)):
    with open(os.path.join(os.fspath(model_dir), name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2)
      f.write("\n")
