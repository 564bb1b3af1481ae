"""Task features → the train step's ``decoder_*`` batch, LLaMA style: BOS is real input, no shift token.

seqio's ``DecoderFeatureConverter`` makes inputs by shifting targets right behind a BOS of 0, T5's pad id,
which is LLaMA's ``<unk>``. LLaMA examples already start with BOS 1, so :class:`LlamaFeatureConverter`
shifts each example before packing instead: for an example ``t_0 .. t_{m-1}`` (BOS/EOS included)::

  decoder_input_tokens  = t_0 .. t_{m-2}         (starts with BOS)
  decoder_target_tokens = t_1 .. t_{m-1}         (ends with EOS)
  decoder_loss_weights  = w_1 .. w_{m-1}         (w_i: weight of predicting t_i; 1 by default)

Rows are then packed (several examples per row, ``decoder_segment_ids`` 1, 2, ... and
``decoder_positions`` restarting at 0 per example) or padded (one example per row, segment id 1). The model
masks attention by segment id, so packed examples never see each other. Padding is token 0, segment id 0,
position 0, loss weight 0: id 0 (LLaMA's ``<unk>``) only ever sits under segment 0, which no real token
attends to, and under weight 0, so it is never a target either.

The task feature length of ``targets`` is the row length ``L``; an example may hold up to ``L`` tokens
(``L-1`` pairs) and is truncated beyond, so long documents must be cut first
(``preprocessors.split_into_chunks``).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
Spec = seqio.FeatureConverter.FeatureSpec

# Features packed side by side; segment ids and positions come from the packer.
_PACKED = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


class LlamaFeatureConverter(seqio.FeatureConverter):
  """``targets`` (int32) and optional ``loss_weights`` (float32, same length) → the ``decoder_*`` batch.

  ``loss_weights`` is used when the examples carry it (instruction tuning: 0 on the prompt, 1 on the
  response); it is not a declared task feature, so ``task_feature_lengths`` is just ``{"targets": L}``.
  (A Mixture keeps only its Tasks' output features, so such Tasks must list ``loss_weights`` among
  theirs.) The output has all five features whether packed or not, each of length ``L``.
  """

  TASK_FEATURES = {"targets": Spec(dtype=tf.int32)}
  MODEL_FEATURES = {
      "decoder_input_tokens": Spec(dtype=tf.int32),
      "decoder_target_tokens": Spec(dtype=tf.int32),
      "decoder_loss_weights": Spec(dtype=tf.float32),
      "decoder_segment_ids": Spec(dtype=tf.int32),
      "decoder_positions": Spec(dtype=tf.int32),
  }
  # Segment ids and positions are model features in both modes, so packing adds none of its own.
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = True) -> None:
    super().__init__(pack=pack)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    length = task_feature_lengths["targets"]
    ds = ds.map(_shift_fn(ds.element_spec), num_parallel_calls=AUTOTUNE)
    if not self.pack:
      ds = ds.map(_add_single_segment, num_parallel_calls=AUTOTUNE)
      return seqio.utils.trim_and_pad_dataset(ds, dict.fromkeys(self.MODEL_FEATURES, length))
    ds = ds.map(_to_packable, num_parallel_calls=AUTOTUNE)
    ds = seqio.utils.trim_and_pack_dataset(ds, dict.fromkeys(_PACKED, length))
    return ds.map(_from_packed, num_parallel_calls=AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    return dict.fromkeys(self.MODEL_FEATURES, task_feature_lengths["targets"])


def _shift_fn(element_spec: Mapping[str, tf.TensorSpec]):
  """Per-example map: inputs = targets[:-1], targets = targets[1:], weights = loss_weights[1:]."""
  weight_spec = element_spec.get("loss_weights")
  if weight_spec is not None and (weight_spec.dtype != tf.float32 or weight_spec.shape.rank != 1):
    raise ValueError(f"loss_weights must be a float32 vector like targets, got {weight_spec}")

  def shift(example):
    tokens = example["targets"]
    if weight_spec is None:
      weights = tf.ones_like(tokens, tf.float32)
    else:
      weights = example["loss_weights"]
      tf.debugging.assert_equal(tf.size(weights), tf.size(tokens),
                                "loss_weights and targets differ in length")
    return {"decoder_input_tokens": tokens[:-1], "decoder_target_tokens": tokens[1:],
            "decoder_loss_weights": weights[1:]}

  return shift


def _add_single_segment(example):
  """Unpacked rows hold one example: segment id 1 and positions 0, 1, ... on its tokens."""
  size = tf.size(example["decoder_input_tokens"])
  return {**example, "decoder_segment_ids": tf.ones([size], tf.int32),
          "decoder_positions": tf.range(size, dtype=tf.int32)}


# seqio's tf-ops packer casts every feature to int32 and takes an example's length to be its number of
# non-zero entries, so a token 0 (<unk>) or a weight 0 (a prompt token) would cut an example short and a
# weight of 0.5 would become 0. Features therefore travel through the packer as non-zero int32: token
# ids plus one, and the float32 weight's bit pattern plus one (exact; a finite float's bits plus one
# neither overflows nor reaches 0).
def _to_packable(example):
  return {"decoder_input_tokens": example["decoder_input_tokens"] + 1,
          "decoder_target_tokens": example["decoder_target_tokens"] + 1,
          "decoder_loss_weights": tf.bitcast(example["decoder_loss_weights"], tf.int32) + 1}


def _from_packed(packed):
  segment_ids = packed["decoder_input_tokens_segment_ids"]
  real = segment_ids > 0
  weights = tf.bitcast(packed["decoder_loss_weights"] - 1, tf.float32)
  return {"decoder_input_tokens": tf.where(real, packed["decoder_input_tokens"] - 1, 0),
          "decoder_target_tokens": tf.where(real, packed["decoder_target_tokens"] - 1, 0),
          "decoder_loss_weights": tf.where(real, weights, 0.0),
          "decoder_segment_ids": segment_ids,
          "decoder_positions": packed["decoder_input_tokens_positions"]}
