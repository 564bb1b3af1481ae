"""Tokenizers for Me-LLaMA checkpoints.

Me-LLaMA is built on LLaMA 2, whose tokenizer is a SentencePiece BPE model
(``tokenizer.model``); LLaMA-3-style folders ship a Hugging Face
``tokenizer.json`` instead.  Generation and the checkpoint converters only need
a small common surface (encode, decode, special-token ids), so both formats are
wrapped behind :class:`Tokenizer` and :func:`load_tokenizer` picks the right
one for a model folder.

The module can also train a tiny LLaMA-convention SentencePiece model so that
tests and the demo run fully offline, and write the Hugging Face config files
that let ``transformers.AutoTokenizer`` load such a model.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import sentencepiece as spm
import tokenizers
from etils import epath

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


class Tokenizer(ABC):
    """Minimal tokenizer interface shared by generation and conversion code.

    Special-token ids are ``None`` when the vocabulary has no such token (LLaMA 2
    has no pad token), so callers must decide explicitly how to pad or stop.
    """

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for ``text``, optionally prefixed by BOS (never suffixed by EOS)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``; BOS/EOS/PAD are dropped so generated ids decode cleanly."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None`` if the vocabulary has none."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id, or ``None`` if the vocabulary has none."""

    @property
    @abstractmethod
    def pad_id(self) -> int | None:
        """Padding id, or ``None`` if the vocabulary has none."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (including special tokens)."""

    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 2 ``tokenizer.model`` (UNK 0, BOS 1, EOS 2, no pad).

    Text is encoded exactly as Meta's reference code does: special-token strings
    such as ``"<s>"`` inside ``text`` are ordinary characters, never control ids.
    """

    def __init__(self, model_path: StrPath) -> None:
        self.model_path = os.fspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = self._sp.encode(text, out_type=int)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        special = self._special_ids()
        return self._sp.decode([int(i) for i in ids if int(i) not in special])

    def id_to_piece(self, token_id: int) -> str:
        """Surface string of a vocabulary entry, e.g. ``"<s>"`` for BOS."""
        return self._sp.id_to_piece(token_id)

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _optional_id(self._sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id; HF configs name it, generation never needs it."""
        return _optional_id(self._sp.unk_id())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


class HFJsonTokenizer(Tokenizer):
    """Hugging Face ``tokenizer.json`` (LLaMA-3 style byte-level BPE).

    The file's post-processor would add special tokens on its own terms; it is
    bypassed (``add_special_tokens=False``) and BOS is prepended explicitly so
    that ``add_bos`` means the same thing for every tokenizer.  Special-token
    names are not reliably stored in ``tokenizer.json`` itself, so the caller
    supplies them (see :func:`load_tokenizer`).
    """

    def __init__(
        self,
        tokenizer_json_path: StrPath,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
    ) -> None:
        self.tokenizer_json_path = os.fspath(tokenizer_json_path)
        self._tok = tokenizers.Tokenizer.from_file(self.tokenizer_json_path)
        self._bos_id = self._token_id(bos_token)
        self._eos_id = self._token_id(eos_token)
        self._pad_id = self._token_id(pad_token)

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in {self.tokenizer_json_path}")
        return token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        special = self._special_ids()
        return self._tok.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _optional_id(token_id: int) -> int | None:
    """SentencePiece reports a disabled special token as -1."""
    return token_id if token_id >= 0 else None


def _token_content(value: Any) -> str | None:
    """HF configs store a special token either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_special_tokens(model_dir: StrPath) -> dict[str, str | None]:
    """Special-token names from ``tokenizer_config.json``, falling back to ``special_tokens_map.json``."""
    merged: dict[str, Any] = {}
    for name in (HF_SPECIAL_TOKENS_MAP_FILE, HF_TOKENIZER_CONFIG_FILE):  # later file wins
        path = epath.Path(model_dir) / name
        if path.is_file():
            merged.update({k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items()
                           if v is not None})
    return {key: _token_content(merged.get(key)) for key in ("bos_token", "eos_token", "pad_token")}


def load_tokenizer(model_dir: StrPath) -> Tokenizer:
    """Tokenizer stored in a model folder.

    ``tokenizer.model`` wins when both formats are present: LLaMA 2 folders
    converted by ``transformers`` often carry a derived ``tokenizer.json`` too,
    and the SentencePiece model is the original the weights were trained with.
    """
    sp_path = epath.Path(model_dir) / SENTENCEPIECE_FILE
    if sp_path.is_file():
        return SentencePieceTokenizer(storage.local_copy(sp_path))
    json_path = epath.Path(model_dir) / HF_TOKENIZER_FILE
    if json_path.is_file():
        special = _read_special_tokens(model_dir)
        return HFJsonTokenizer(storage.local_copy(json_path), special["bos_token"], special["eos_token"],
                               special["pad_token"])
    raise FileNotFoundError(
        f"no tokenizer in {os.fspath(model_dir)!r}: expected {SENTENCEPIECE_FILE!r} or {HF_TOKENIZER_FILE!r}"
    )


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

    The options mirror LLaMA 2's trainer spec (byte fallback, split digits,
    identity normalization, whitespace kept verbatim, UNK/BOS/EOS = 0/1/2, no
    pad) so that code exercised with it behaves as with the real tokenizer.
    Training uses every input line, one thread and no shuffling, so the result
    is deterministic; ``vocab_size`` is a hard limit (training fails rather than
    silently producing a smaller vocabulary).
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


def write_hf_tokenizer_config(dst_dir: StrPath, tokenizer: Tokenizer) -> None:
    """Write ``tokenizer_config.json`` and ``special_tokens_map.json`` for a LLaMA SentencePiece tokenizer.

    Together with ``tokenizer.model`` in the same folder (see
    :func:`copy_tokenizer_files`), ``transformers.AutoTokenizer`` then loads a
    ``LlamaTokenizer`` that adds BOS but not EOS, like :meth:`Tokenizer.encode`.
    ``legacy: false`` is the modern LLaMA setting (no extra space after special
    tokens).  Two differences remain in transformers 5 and cannot be configured
    away: text starting with whitespace gets no extra dummy-prefix ``"▁"`` (its
    Metaspace pre-tokenizer skips the prefix when the text already starts with
    one), and special-token strings such as ``"<s>"`` inside the text are parsed
    as special ids (kept, because chat templates rely on it).
    """
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise TypeError(
            f"HF LlamaTokenizer configs need a SentencePiece tokenizer, got {type(tokenizer).__name__}"
        )
    special = {
        key: tokenizer.id_to_piece(token_id)
        for key, token_id in (
            ("bos_token", tokenizer.bos_id),
            ("eos_token", tokenizer.eos_id),
            ("unk_token", tokenizer.unk_id),
        )
        if token_id is not None
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    os.makedirs(dst_dir, exist_ok=True)
    for name, content in ((HF_TOKENIZER_CONFIG_FILE, config), (HF_SPECIAL_TOKENS_MAP_FILE, special)):
        with open(os.path.join(dst_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
