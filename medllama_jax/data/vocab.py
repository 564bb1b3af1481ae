"""The LLaMA 2 SentencePiece model as a seqio vocabulary.

seqio's conventions come from T5 (PAD 0, EOS 1, UNK 2, no BOS, optional sentinel "extra ids"
appended to the vocabulary); LLaMA's tokenizer has UNK 0, BOS 1, EOS 2 and no pad, and its 32,000 ids
must match the rows of the embedding table. :func:`llama_vocabulary` therefore adds no extra ids and
refuses a model whose special ids differ. What seqio keeps:

* ``encode``/``encode_tf`` add neither BOS nor EOS; ``preprocessors.add_bos_eos`` adds both, once.
* ``pad_id`` stays 0, which is LLaMA's ``<unk>``. That is harmless: ``LlamaFeatureConverter`` writes 0
  only into padding, which has segment id 0 (no real token attends to it) and loss weight 0 (never a
  target).
* ``decode`` stops at the first EOS, like LLaMA generation.
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

from medllama_jax.tokenizer import SENTENCEPIECE_FILE

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2


def llama_vocabulary(sentencepiece_model_path: str) -> seqio.SentencePieceVocabulary:
  """seqio vocabulary over a LLaMA ``tokenizer.model``: no extra ids; UNK 0, BOS 1, EOS 2 checked.

  ``sentencepiece_model_path`` may also be a model folder (local or ``gs://``) holding
  ``tokenizer.model``, so training configs can point at the checkpoint they start from.
  """
  if tf.io.gfile.isdir(sentencepiece_model_path):
    sentencepiece_model_path = os.path.join(sentencepiece_model_path, SENTENCEPIECE_FILE)
  vocabulary = seqio.SentencePieceVocabulary(sentencepiece_model_path, extra_ids=0)
  found = {"unk": vocabulary.unk_id, "bos": vocabulary.bos_id, "eos": vocabulary.eos_id}
  expected = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
  if found != expected:
    raise ValueError(f"{sentencepiece_model_path} has special ids {found}; a LLaMA tokenizer has "
                     f"{expected}")
  return vocabulary
