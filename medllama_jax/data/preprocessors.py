"""seqio preprocessors for LLaMA-style causal language modelling of whole documents.

A tokenized document becomes ``[BOS] + tokens + [EOS]`` (:func:`frame_documents`, with the BOS only where the
tokenizer adds one; placed before seqio's cache,
as it does not depend on the sequence length), then is cut into chunks that each fit one row
(:func:`split_into_chunks`; after the cache, since it does). Without the cut, seqio's packing would
truncate every example longer than a row: a 20k-token PMC article would keep its first 4,096 tokens.

The chunk rule, for rows of ``L`` positions and a document ``t_0 .. t_{n-1}`` of ``n`` tokens::

  chunk k = t[k(L-1) : k(L-1) + L]        for k = 0 .. ceil((n-1) / (L-1)) - 1

Chunks hold at most ``L`` tokens and consecutive chunks share exactly one token. ``LlamaFeatureConverter``
turns a chunk of ``m`` tokens into the ``m-1`` (input, target) pairs ``t_i -> t_{i+1}`` it contains, so
every pair of the document (``i = 0 .. n-2``) is trained on exactly once and no chunk is ever trimmed.
Documents with fewer than two tokens contain no pair and yield no chunk. The price is one position per
full chunk (``L-1`` pairs in a row of ``L``), which packing can fill only with a one-pair example.
Continuation chunks restart at position 0 without a BOS, as rows of concatenated text do in LLaMA's own
pre-training; the model never sees the earlier part of the document from them.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def frame_documents(dataset: tf.data.Dataset,
                    output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """``targets`` → ``prefix + targets + [EOS]``: what the ``targets`` vocabulary's tokenizer puts
  before a text (``[BOS]`` for LLaMA, nothing for GPT-2-style tokenizers), then the document, then
  EOS, which ends every document whatever the tokenizer adds after a text.

  For raw text (pre-training); instruction examples get theirs where prompt and response are joined.
  """
  vocabulary = output_features["targets"].vocabulary
  prefix = tf.constant(vocabulary.prefix_ids, tf.int32, shape=[len(vocabulary.prefix_ids)])
  eos = tf.constant([vocabulary.eos_id], tf.int32)

  def add(example):
    return {**example, "targets": tf.concat([prefix, example["targets"], eos], axis=0)}

  return dataset.map(add, num_parallel_calls=AUTOTUNE)


def split_into_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                      output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Cuts each example into chunks of at most ``sequence_length["targets"]`` tokens (module docstring).

  Every output feature the examples carry (``targets``, and ``loss_weights`` where present) is cut at the
  same places; other features (e.g. the document ``id``) are copied into every chunk. Without a
  ``targets`` length (seqio called without ``sequence_length``) documents are left whole.
  """
  length = (sequence_length or {}).get("targets")
  if length is None:
    return dataset
  if length < 2:
    raise ValueError(f"sequence length {length}: a row needs at least 2 positions for one "
                     "(input, target) pair")
  stride = length - 1
  keys = [k for k in output_features if k in dataset.element_spec]

  def chunks(example):
    num_tokens = tf.shape(example["targets"], out_type=tf.int64)[0]
    num_chunks = (num_tokens - 1 + stride - 1) // stride

    def chunk(index):
      start = index * stride
      return {k: v[start:start + length] if k in keys else v for k, v in example.items()}

    return tf.data.Dataset.range(num_chunks).map(chunk)

  return dataset.flat_map(chunks)
