"""Token statistics of prepared corpora and a pre-training mixture that is 15 : 1 : 4 in trained tokens.

On the demo's shipped corpus samples (prepared as the demo does) and a demo tokenizer: the stored
histogram equals the framed documents' lengths seqio produces, the mean tokens per example at a row
length equals the real chunks', and the trainer's batches carry the configured token shares with
``rate_unit="tokens"``, which example-count rates miss on the same data.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import seqio

from medllama_jax import demo
from medllama_jax.data import token_stats
from medllama_jax.data.pipeline import make_data_iterator
from medllama_jax.data.vocab import model_vocabulary
from seqio_tasks.pretrain import CORPORA, ME_LLAMA_GROUP_RATES, register_pretrain_mixture, \
  register_text_task

LENGTH, BATCH, NUM_BATCHES = 128, 16, 300
# The realized share of each group must be within 1 percentage point of 15 : 1 : 4 (75 / 5 / 20 %).
TOLERANCE = 0.01
TARGET = {group: rate / sum(ME_LLAMA_GROUP_RATES.values())
          for group, rate in ME_LLAMA_GROUP_RATES.items()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("token_mixing")
  demo.prepare_corpora(str(root / "data"))
  demo.train_tokenizer(str(root / "model"), 1024)
  return root


@pytest.fixture(scope="module")
def vocabulary(workspace):
  return model_vocabulary(str(workspace / "model"))


def task_lengths(corpus_dir: str, vocabulary_path: str, sequence_length: int | None) -> list[int]:
  """Token counts of the examples the corpus's real Task yields: whole framed documents without a
  ``sequence_length``, else chunks."""
  name = register_text_task("token_mixing_probe", corpus_dir, vocabulary_path)
  lengths = {"targets": sequence_length} if sequence_length else None
  dataset = seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", shuffle=False)
  return [len(example["targets"]) for example in dataset.as_numpy_iterator()]


@pytest.mark.parametrize("corpus", ["pubmed_abstracts", "pmc_fulltext", "redpajama"])
def test_histogram_is_the_framed_documents_lengths(workspace, vocabulary, corpus):
  corpus_dir = str(workspace / "data" / corpus)
  stats = token_stats.write_token_stats(corpus_dir, vocabulary)
  histogram = token_stats.split_histogram(stats, "train")
  assert histogram == collections.Counter(task_lengths(corpus_dir, str(workspace / "model"), None))
  assert stats["splits"]["train"]["tokens"] == sum(n * c for n, c in histogram.items())
  assert set(stats["splits"]) == {"train", "validation"}


@pytest.mark.parametrize("sequence_length", [3, 9, 64, LENGTH])
def test_tokens_per_example_is_that_of_the_real_chunks(workspace, vocabulary, sequence_length):
  corpus_dir = str(workspace / "data" / "pmc_fulltext")  # full texts: several chunks per document
  histogram = token_stats.split_histogram(token_stats.token_stats(corpus_dir, vocabulary), "train")
  chunks = task_lengths(corpus_dir, str(workspace / "model"), sequence_length)
  # A chunk of m tokens fills m - 1 positions of a row.
  assert token_stats.tokens_per_example(histogram, sequence_length) == pytest.approx(
      np.mean(chunks) - 1, rel=1e-12)


def test_stats_of_another_tokenizer_are_not_used(workspace, vocabulary, tmp_path):
  corpus_dir = str(workspace / "data" / "redpajama")
  token_stats.write_token_stats(corpus_dir, vocabulary)
  other = model_vocabulary(demo.train_tokenizer(str(tmp_path / "other"), 512))
  assert token_stats.read_token_stats(corpus_dir, other) is None
  recounted = token_stats.token_stats(corpus_dir, other)  # counted again and written
  with open(os.path.join(corpus_dir, token_stats.TOKEN_STATS_FILE)) as f:
    assert json.load(f) == recounted
  assert token_stats.read_token_stats(corpus_dir, vocabulary) is None
  assert token_stats.read_token_stats(corpus_dir, other) == recounted


def chunk_groups(data_dir, vocabulary_path: str) -> dict[tuple[int, ...], str]:
  """Every chunk (at rows of LENGTH) of every corpus → its corpus's group; a chunk found in corpora of
  two groups could not be attributed and fails the test."""
  groups = {}
  for corpus, spec in CORPORA.items():
    for chunk in set(map(tuple, chunk_tokens(str(data_dir / corpus), vocabulary_path))):
      assert groups.setdefault(chunk, spec.group) == spec.group, f"a chunk of {corpus} is elsewhere"
  return groups


def chunk_tokens(corpus_dir: str, vocabulary_path: str):
  name = register_text_task("token_mixing_probe", corpus_dir, vocabulary_path)
  dataset = seqio.get_mixture_or_task(name).get_dataset({"targets": LENGTH}, split="train",
                                                        shuffle=False)
  return [example["targets"].tolist() for example in dataset.as_numpy_iterator()]


def realized_shares(mixture: str, groups: dict[tuple[int, ...], str]) -> dict[str, float]:
  """Each group's share of the non-padding target tokens of NUM_BATCHES training batches.

  Batches come from the trainer's iterator (seqio mixing, chunking, LlamaFeatureConverter packing);
  each packed segment is one chunk (inputs plus the last target), attributed through ``groups``.
  """
  tokens = collections.Counter()
  iterator = make_data_iterator(mixture, LENGTH, BATCH, shard_index=0, num_shards=1, seed=0)
  for _ in range(NUM_BATCHES):
    batch = next(iterator)
    for inputs, targets, weights, segments in zip(
        batch["decoder_input_tokens"], batch["decoder_target_tokens"],
        batch["decoder_loss_weights"], batch["decoder_segment_ids"]):
      for segment in np.unique(segments[segments > 0]):
        mask = segments == segment
        chunk = (*inputs[mask].tolist(), int(targets[mask][-1]))
        tokens[groups[chunk]] += int(weights[mask].sum())
  total = sum(tokens.values())
  return {group: tokens[group] / total for group in TARGET}


def test_token_rates_give_the_configured_token_shares(workspace):
  data_dir, vocabulary_path = workspace / "data", str(workspace / "model")
  groups = chunk_groups(data_dir, vocabulary_path)
  shares = {}
  for unit in ("tokens", "examples"):
    mixture = register_pretrain_mixture(str(data_dir), vocabulary_path, rate_unit=unit,
                                        sequence_length=LENGTH, mixture_name=f"token_mixing_{unit}")
    shares[unit] = realized_shares(mixture, groups)
  print({unit: {g: round(s, 4) for g, s in by_group.items()} for unit, by_group in shares.items()})
  assert shares["tokens"] == pytest.approx(TARGET, abs=TOLERANCE)
  # Example-count rates weigh each corpus by its mean tokens per chunk: off by several points here.
  assert max(abs(shares["examples"][g] - TARGET[g]) for g in TARGET) > 3 * TOLERANCE


def test_token_rates_need_the_row_length(workspace):
  with pytest.raises(ValueError, match="sequence_length"):
    register_pretrain_mixture(str(workspace / "data"), str(workspace / "model"), rate_unit="tokens")
  with pytest.raises(ValueError, match="rate_unit"):
    register_pretrain_mixture(str(workspace / "data"), str(workspace / "model"), rate_unit="chunks")
