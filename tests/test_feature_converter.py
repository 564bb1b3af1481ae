"""LlamaFeatureConverter and the chunking preprocessor on hand-made token ids: exact rows."""

from __future__ import annotations

import numpy as np
import pytest
import seqio
import tensorflow as tf

from medllama_jax.data.feature_converter import LlamaFeatureConverter
from medllama_jax.data.preprocessors import split_into_chunks

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
OUTPUT_FEATURES = {
    "targets": seqio.Feature(seqio.PassThroughVocabulary(100), add_eos=False),
    "loss_weights": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.float32),
}
# BOS 1 ... EOS 2; the third document holds token 0 (<unk>), which must not end it early.
DOCS = [[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 0, 4, 2]]


def dataset(examples: list[dict[str, list]]) -> tf.data.Dataset:
  signature = {"targets": tf.TensorSpec([None], tf.int32)}
  if "loss_weights" in examples[0]:
    signature["loss_weights"] = tf.TensorSpec([None], tf.float32)
  if "id" in examples[0]:
    signature["id"] = tf.TensorSpec([], tf.string)

  def generate():
    for example in examples:
      yield {k: np.asarray(v, signature[k].dtype.as_numpy_dtype) for k, v in example.items()}

  return tf.data.Dataset.from_generator(generate, output_signature=signature)


def convert(examples: list[dict[str, list]], length: int, pack: bool) -> list[dict[str, np.ndarray]]:
  rows = list(LlamaFeatureConverter(pack=pack)(dataset(examples), {"targets": length})
              .as_numpy_iterator())
  for row in rows:
    assert set(row) == set(FEATURES)
    assert all(v.shape == (length,) for v in row.values())
    assert row["decoder_loss_weights"].dtype == np.float32
    assert all(row[k].dtype == np.int32 for k in FEATURES if k != "decoder_loss_weights")
  return rows


def assert_rows(rows: list[dict[str, np.ndarray]], expected: list[dict[str, list]]) -> None:
  assert len(rows) == len(expected)
  for row, want in zip(rows, expected):
    for k in FEATURES:
      np.testing.assert_array_equal(row[k], np.asarray(want[k], row[k].dtype), err_msg=k)


def test_packed_rows_shift_each_document_and_restart_segments():
  rows = convert([{"targets": d} for d in DOCS], length=8, pack=True)
  assert_rows(rows, [
      {"decoder_input_tokens": [1, 5, 6, 7, 1, 8, 9, 0],
       "decoder_target_tokens": [5, 6, 7, 2, 8, 9, 2, 0],
       "decoder_loss_weights": [1, 1, 1, 1, 1, 1, 1, 0],
       "decoder_segment_ids": [1, 1, 1, 1, 2, 2, 2, 0],
       "decoder_positions": [0, 1, 2, 3, 0, 1, 2, 0]},
      # 3 more pairs would overflow the first row's 8 positions: the third document starts a row.
      {"decoder_input_tokens": [1, 0, 4, 0, 0, 0, 0, 0],
       "decoder_target_tokens": [0, 4, 2, 0, 0, 0, 0, 0],
       "decoder_loss_weights": [1, 1, 1, 0, 0, 0, 0, 0],
       "decoder_segment_ids": [1, 1, 1, 0, 0, 0, 0, 0],
       "decoder_positions": [0, 1, 2, 0, 0, 0, 0, 0]},
  ])


def test_unpacked_rows_hold_one_document_each():
  rows = convert([{"targets": d} for d in DOCS], length=6, pack=False)
  assert_rows(rows, [
      {"decoder_input_tokens": [1, 5, 6, 7, 0, 0],
       "decoder_target_tokens": [5, 6, 7, 2, 0, 0],
       "decoder_loss_weights": [1, 1, 1, 1, 0, 0],
       "decoder_segment_ids": [1, 1, 1, 1, 0, 0],
       "decoder_positions": [0, 1, 2, 3, 0, 0]},
      {"decoder_input_tokens": [1, 8, 9, 0, 0, 0],
       "decoder_target_tokens": [8, 9, 2, 0, 0, 0],
       "decoder_loss_weights": [1, 1, 1, 0, 0, 0],
       "decoder_segment_ids": [1, 1, 1, 0, 0, 0],
       "decoder_positions": [0, 1, 2, 0, 0, 0]},
      {"decoder_input_tokens": [1, 0, 4, 0, 0, 0],
       "decoder_target_tokens": [0, 4, 2, 0, 0, 0],
       "decoder_loss_weights": [1, 1, 1, 0, 0, 0],
       "decoder_segment_ids": [1, 1, 1, 0, 0, 0],
       "decoder_positions": [0, 1, 2, 0, 0, 0]},
  ])


@pytest.mark.parametrize("pack", [True, False])
def test_loss_weights_follow_the_feature(pack: bool):
  # Prompt "10 11", response "12 13" EOS; weight i is that of predicting token i (BOS's is never used).
  examples = [{"targets": [1, 10, 11, 12, 13, 2], "loss_weights": [7, 0, 0, 1, 0.5, 1]},
              {"targets": [1, 3, 2], "loss_weights": [0, 0.25, 1]}]
  rows = convert(examples, length=8, pack=pack)
  if pack:
    assert_rows(rows, [
        {"decoder_input_tokens": [1, 10, 11, 12, 13, 1, 3, 0],
         "decoder_target_tokens": [10, 11, 12, 13, 2, 3, 2, 0],
         "decoder_loss_weights": [0, 0, 1, 0.5, 1, 0.25, 1, 0],
         "decoder_segment_ids": [1, 1, 1, 1, 1, 2, 2, 0],
         "decoder_positions": [0, 1, 2, 3, 4, 0, 1, 0]}])
  else:
    assert_rows(rows, [
        {"decoder_input_tokens": [1, 10, 11, 12, 13, 0, 0, 0],
         "decoder_target_tokens": [10, 11, 12, 13, 2, 0, 0, 0],
         "decoder_loss_weights": [0, 0, 1, 0.5, 1, 0, 0, 0],
         "decoder_segment_ids": [1, 1, 1, 1, 1, 0, 0, 0],
         "decoder_positions": [0, 1, 2, 3, 4, 0, 0, 0]},
        {"decoder_input_tokens": [1, 3, 0, 0, 0, 0, 0, 0],
         "decoder_target_tokens": [3, 2, 0, 0, 0, 0, 0, 0],
         "decoder_loss_weights": [0.25, 1, 0, 0, 0, 0, 0, 0],
         "decoder_segment_ids": [1, 1, 0, 0, 0, 0, 0, 0],
         "decoder_positions": [0, 1, 0, 0, 0, 0, 0, 0]}])


def test_mismatched_loss_weights_are_rejected():
  with pytest.raises(tf.errors.InvalidArgumentError, match="differ in length"):
    convert([{"targets": [1, 5, 2], "loss_weights": [0, 1]}], length=8, pack=True)


def test_model_feature_lengths_are_the_row_length():
  assert LlamaFeatureConverter().get_model_feature_lengths({"targets": 16}) == dict.fromkeys(
      FEATURES, 16)


def chunk(examples: list[dict[str, list]], length: int) -> list[dict[str, np.ndarray]]:
  return list(split_into_chunks(dataset(examples), {"targets": length}, OUTPUT_FEATURES)
              .as_numpy_iterator())


def test_chunks_overlap_by_one_token_and_carry_weights_and_id():
  tokens = list(range(100, 123))  # n = 23 tokens, rows of L = 8: stride 7, ceil(22 / 7) = 4 chunks
  weights = [i / 32 for i in range(23)]
  chunks = chunk([{"targets": tokens, "loss_weights": weights, "id": b"doc"}], length=8)
  assert [c["targets"].tolist() for c in chunks] == [
      tokens[0:8], tokens[7:15], tokens[14:22], tokens[21:23]]
  for c, start in zip(chunks, (0, 7, 14, 21)):
    np.testing.assert_array_equal(c["loss_weights"], np.float32(weights[start:start + 8]))
    assert c["id"] == b"doc"


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 7, 8, 9, 15, 16, 50])
def test_every_pair_of_a_document_is_in_exactly_one_chunk(num_tokens: int):
  length = 8
  tokens = list(range(1000, 1000 + num_tokens))
  chunks = [c["targets"].tolist() for c in chunk([{"targets": tokens}], length)]
  assert all(2 <= len(c) <= length for c in chunks)
  pairs = [(c[i], c[i + 1]) for c in chunks for i in range(len(c) - 1)]
  assert pairs == list(zip(tokens, tokens[1:]))  # each pair once, in document order
  assert len(chunks) == max(0, -(-(num_tokens - 1) // (length - 1)))


def test_chunked_long_document_is_trained_on_every_pair_once_when_packed():
  length = 8
  document = [1] + list(range(10, 40)) + [2]  # 32 tokens: 31 pairs, more than 3 rows' worth
  chunked = chunk([{"targets": document}, {"targets": [1, 5, 2]}], length)
  rows = convert([{"targets": c["targets"].tolist()} for c in chunked], length, pack=True)
  trained = [(int(i), int(t)) for row in rows
             for i, t, w in zip(row["decoder_input_tokens"], row["decoder_target_tokens"],
                                row["decoder_loss_weights"]) if w > 0]
  assert sorted(trained) == sorted(list(zip(document, document[1:])) + [(1, 5), (5, 2)])
