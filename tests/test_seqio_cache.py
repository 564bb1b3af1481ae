"""seqio's offline cache of a pre-training Task, built by seqio's own Beam pipeline and read back.

``seqio_cache_tasks``'s ``main`` runs with command-line flags on Beam's DirectRunner (in memory):
the Task is registered only by importing the ``--module_import`` module (tests/seqio_cache_task.py),
and the transforms, the vocabulary among them, go through Beam's pickling as to remote workers. The
corpus is the shipped PubMed sample as ``prepare_corpora`` prepares it.

The cache holds the examples in the order of Beam's ``Reshuffle`` (random keys), not in the source's,
so cached and uncached data agree as multisets: of the documents (ids and token ids), of the chunks
cut after the cache, and, through the trainer's iterator, of the packed segments over one epoch.
Batch for batch, the cached iterator is checked against itself under one seed (the same batches
twice: what resuming and multi-process reading rely on). Last, the trainer runs a few steps on the
cache with the prepared corpus moved away.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

import apache_beam  # noqa: F401  (the ``beam`` extra: the test runs wherever it is installed)
import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from seqio.scripts import cache_tasks_main

import tokenizer_families as families
from medllama_jax import demo
from medllama_jax.data.pipeline import make_data_iterator
from medllama_jax.train import loop

TASK = "seqio_cache_test_pubmed_abstracts"  # what tests/seqio_cache_task.py registers
SPLITS = ("train", "validation")
NUM_CACHE_SHARDS = 2
LENGTH, BATCH = 64, 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """Runs ``seqio_cache_tasks`` with command-line flags; the Task is registered only by the
  ``--module_import`` module, as in a real run."""
  root = tmp_path_factory.mktemp("seqio_cache")
  demo.prepare_corpora(str(root / "data"))
  vocabulary = families.build("sentencepiece_llama2", _mkdir(root / "tokenizer"))
  output = str(root / "cache")
  saved_env, saved_dirs = dict(os.environ), list(seqio.get_global_cache_dirs())
  os.environ.update({
      "MEDLLAMA_CACHE_TEST_CORPUS": str(root / "data" / "pubmed_abstracts"),
      "MEDLLAMA_CACHE_TEST_VOCABULARY": str(vocabulary)})
  try:
    with flagsaver.flagsaver():
      flags.FLAGS([
          "seqio_cache_tasks", f"--tasks={TASK}", f"--output_cache_dir={output}",
          "--module_import=seqio_cache_task", f"--min_shards={NUM_CACHE_SHARDS}",
          "--pipeline_options=--runner=DirectRunner"])
      cache_tasks_main.main([])
    yield output
  finally:
    os.environ.clear()
    os.environ.update(saved_env)
    seqio.set_global_cache_dirs(saved_dirs)


def _mkdir(path: Path) -> Path:
  path.mkdir()
  return path


def _documents(split: str, use_cached: bool, sequence_length: int | None = None
               ) -> collections.Counter:
  """(id, token ids) of every example, in a multiset: the cache keeps Beam's order."""
  task = seqio.get_mixture_or_task(TASK)
  dataset = task.get_dataset(None if sequence_length is None else {"targets": sequence_length},
                             split=split, use_cached=use_cached, shuffle=False)
  return collections.Counter((ex["id"], tuple(ex["targets"].tolist()))
                             for ex in dataset.as_numpy_iterator())


def _batches(use_cached: bool, cache: str, batch_size: int = BATCH, steps: int | None = None,
             **kwargs) -> list[dict[str, np.ndarray]]:
  """The first ``steps`` batches (all if None) of the trainer's iterator over the Task alone."""
  iterator = make_data_iterator(TASK, LENGTH, batch_size, num_shards=1, shard_index=0,
                                use_cached=use_cached, cache_dirs=[cache] if use_cached else (),
                                **kwargs)
  return list(itertools.islice(iterator, steps))


def _segments(batches: list[dict[str, np.ndarray]]) -> collections.Counter:
  """Each packed segment's inputs, targets, loss weights and positions, in a multiset."""
  found = collections.Counter()
  for batch in batches:
    for row in range(batch["decoder_segment_ids"].shape[0]):
      ids = batch["decoder_segment_ids"][row]
      for segment in set(ids.tolist()) - {0}:
        where = ids == segment
        found[tuple(tuple(batch[k][row][where].tolist()) for k in (
            "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_positions"))] += 1
  return found


def test_the_cache_folder_has_what_seqio_reads(cache_dir: str):
  task_dir = os.path.join(cache_dir, TASK)
  assert tf.io.gfile.exists(os.path.join(task_dir, "COMPLETED"))
  assert seqio.get_mixture_or_task(TASK).cache_dir == task_dir
  for split in SPLITS:
    info = json.loads(Path(seqio.get_cached_info_path(task_dir, split)).read_text())
    assert info["num_shards"] == NUM_CACHE_SHARDS
    assert info["features"] == {"targets": {"dtype": "int32", "shape": [None]},
                                "id": {"dtype": "string", "shape": []}}
    assert len(tf.io.gfile.glob(seqio.get_cached_tfrecord_prefix(task_dir, split) + "*")) \
        == NUM_CACHE_SHARDS
    stats = json.loads(Path(seqio.get_cached_stats_path(task_dir, split)).read_text())
    documents = _documents(split, use_cached=False)
    assert stats["examples"] == sum(documents.values()) > 0
    # seqio counts the tokens that are neither EOS nor padding: all but the EOS ending a document.
    assert stats["targets_tokens"] == sum(len(tokens) - 1 for _, tokens in documents)


@pytest.mark.parametrize("sequence_length", [None, 48, LENGTH])
def test_cached_examples_equal_the_uncached_ones(cache_dir: str, sequence_length: int | None):
  """Whole documents, and chunks cut after the cache at two lengths from the one cache."""
  for split in SPLITS:
    cached = _documents(split, use_cached=True, sequence_length=sequence_length)
    assert cached == _documents(split, use_cached=False, sequence_length=sequence_length)
    assert len({doc_id for doc_id, _ in cached}) > 1


def test_the_trainers_iterator_reads_the_cache(cache_dir: str):
  """One epoch of one-row batches, so that no row is left in a dropped last batch: which rows those
  are depends on the order."""
  once = dict(shuffle=False, num_epochs=1, batch_size=1)
  cached, uncached = _batches(True, cache_dir, **once), _batches(False, cache_dir, **once)
  assert cached and uncached
  assert {k: v.shape for k, v in cached[0].items()} == {k: v.shape for k, v in uncached[0].items()}
  assert _segments(cached) == _segments(uncached)
  shuffled = dict(shuffle=True, seed=3, steps=3)
  first, second = (_batches(True, cache_dir, **shuffled) for _ in range(2))
  assert len(first) == 3
  for a, b in zip(first, second):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_training_runs_on_the_cache_alone(cache_dir: str, tmp_path: Path):
  """A few training steps with ``make_data_iterator.use_cached = True`` while the prepared corpus
  is out of reach: every batch comes from the cache, and the loss falls."""
  root = Path(cache_dir).parent
  corpus = root / "data" / "pubmed_abstracts"
  run_dir = tmp_path / "run"
  bindings = {
      "medllama_jax.config.model_config.preset": '"tiny"',
      "medllama_jax.partitioning.make_mesh.data": 2,
      "medllama_jax.partitioning.make_mesh.fsdp": 2,
      "medllama_jax.partitioning.make_mesh.tensor": 2,
      "medllama_jax.train.optimizer.make_optimizer.peak_lr": 3e-3,
      "make_data_iterator.use_cached": True,
      "make_data_iterator.cache_dirs": f"['{cache_dir}']",
      "make_data_iterator.num_shards": 1,
      "train.run_dir": f"'{run_dir}'",
      "train.mixture": f"'{TASK}'",
      "train.tokenizer_dir": f"'{root / 'tokenizer'}'",
      "train.sequence_length": LENGTH,
      "train.global_batch_size": 8,
      "train.total_steps": 6,
      "train.save_every": 6,
      "train.log_every": 1,
  }
  gin.clear_config()
  gin.parse_config([f"{name} = {value}" for name, value in bindings.items()])
  corpus.rename(corpus.with_name("away"))
  try:
    loop.train()
  finally:
    corpus.with_name("away").rename(corpus)
    gin.clear_config()
  losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert losses[-1] < losses[0]
