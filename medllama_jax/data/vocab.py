"""A model folder's tokenizer as a seqio vocabulary, so training and evaluation data get the ids
generation and ``transformers`` give.

seqio's conventions come from T5 (PAD 0, EOS 1, UNK 2, no BOS, sentinel "extra ids" appended to the
vocabulary); LLaMA-family tokenizers have their own special ids and a vocabulary that must match
the rows of the embedding table. :class:`TokenizerVocabulary` therefore wraps
:class:`medllama_jax.tokenizer.Tokenizer` (SentencePiece ``tokenizer.model`` or ``tokenizer.json``)
with no extra ids and the tokenizer's own BOS/EOS/UNK. What seqio keeps:

* ``encode``/``encode_tf`` add no special tokens; the tokenizer's own ``prefix_ids`` (BOS where it
  adds one) and ``suffix_ids`` are added where a whole text is assembled (documents, prompts, chat
  renderings).
* ``pad_id`` stays 0 whatever token that is: feature converters write 0 only into padding, which has
  segment id 0 (no real token attends to it) and loss weight 0 (never a target).
* ``decode`` stops at the first EOS, like generation.

In tf.data the tokenizer runs through ``tf.numpy_function`` (the Rust ``tokenizers`` library, which
releases the GIL), so the ids are those of the Python side by construction.
"""

from __future__ import annotations

import hashlib

import numpy as np
import seqio
import tensorflow as tf

from medllama_jax import tokenizer as tokenizer_lib


class TokenizerVocabulary(seqio.Vocabulary):
  """seqio vocabulary over the tokenizer of a model folder (local or ``gs://``)."""

  def __init__(self, model_dir: str) -> None:
    self.model_dir = model_dir
    self.tokenizer = tokenizer_lib.load_tokenizer(model_dir)
    if self.tokenizer.eos_id is None:
      raise ValueError(f"{self.tokenizer.source}: the tokenizer names no EOS token; documents and "
                       "answers need one (set eos_token in tokenizer_config.json)")
    # Equal fingerprints, equal ids for every text: what equality and cached token counts rest on.
    self.fingerprint = hashlib.sha256(
        (self.tokenizer.to_str() + repr(sorted(self.tokenizer.special_tokens.items()))).encode()
    ).hexdigest()
    super().__init__(extra_ids=0)

  @property
  def bos_id(self) -> int | None:
    return self.tokenizer.bos_id

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def unk_id(self) -> int | None:
    return self.tokenizer.unk_id

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    """What the tokenizer puts before a text (``(BOS,)`` for LLaMA, nothing for GPT-2 style)."""
    return self.tokenizer.prefix_ids

  @property
  def suffix_ids(self) -> tuple[int, ...]:
    """What the tokenizer puts after a text (usually nothing)."""
    return self.tokenizer.suffix_ids

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer.encode(s, add_special_tokens=False)

  def _decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])

  def _encode_numpy(self, texts: np.ndarray | bytes) -> tuple[np.ndarray, np.ndarray]:
    """A scalar string arrives as ``bytes``, a batch as an object array of them."""
    flat_texts = np.asarray(texts, dtype=object).reshape(-1)
    encoded = self.tokenizer.encode_batch([t.decode("utf-8") for t in flat_texts],
                                          add_special_tokens=False)
    lengths = np.array([len(ids) for ids in encoded], np.int64)
    flat = np.fromiter((i for ids in encoded for i in ids), np.int32, count=int(lengths.sum()))
    return flat, lengths

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """Scalar string → int32 ids; a 1-D batch of strings → a ragged ``[batch, None]``."""
    flat, lengths = tf.numpy_function(self._encode_numpy, [s], (tf.int32, tf.int64), stateful=False)
    flat.set_shape([None])
    if s.shape.rank == 0:
      return flat
    lengths.set_shape([None])
    return tf.RaggedTensor.from_row_lengths(flat, lengths)

  def _decode_numpy(self, ids: np.ndarray) -> np.ndarray:
    rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    texts = []
    for row in rows.tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      texts.append(self.tokenizer.decode(row).encode("utf-8"))
    return np.array(texts, dtype=object).reshape(ids.shape[:-1] if ids.ndim else ())

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    texts = tf.numpy_function(self._decode_numpy, [ids], tf.string, stateful=False)
    texts.set_shape(ids.shape[:-1] if ids.shape.rank else [])
    return texts

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """Ids (any leading batch shape) → text up to the first EOS of each row."""
    return self._decode_tf(ids)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, TokenizerVocabulary) and other.fingerprint == self.fingerprint

  def __hash__(self) -> int:
    return hash(self.fingerprint)

  def __str__(self) -> str:
    return f"TokenizerVocabulary({self.model_dir}, {self.tokenizer.vocab_size} ids)"


def model_vocabulary(path: str) -> TokenizerVocabulary:
  """The vocabulary of a model folder or of a tokenizer file (``load_tokenizer`` says which)."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"no tokenizer folder or file {path!r}")
  return TokenizerVocabulary(path)
