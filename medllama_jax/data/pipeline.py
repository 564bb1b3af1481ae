"""The trainer's input: per-process batches from a seqio task or mixture, resumable, then global arrays.

Every process reads its own shard of the data (``seqio.ShardInfo(jax.process_index(),
jax.process_count())``): seqio shards the files of each corpus, or its examples when a corpus has fewer
files than shards. A process yields ``global_batch_size // num_shards`` rows per step, and
:func:`global_batch` stitches the processes' rows into arrays sharded over the data-parallel mesh axes.

The stream is a pure function of the seed: tf.data runs deterministically, and seqio's file shuffles,
example shuffles and mixture sampling are seeded. Its position is saved the way t5x does, with
``tf.train.Checkpoint`` of the tf.data iterator (shuffle buffers and the sampler state included), one
folder per process, so a restored iterator yields exactly the batches the original would have yielded.
"""

from __future__ import annotations

import os

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from jax.sharding import Mesh

from medllama_jax import partitioning
from medllama_jax.data.feature_converter import LlamaFeatureConverter


class DataIterator:
  """Batches as numpy dicts (the five ``decoder_*`` features, ``[local_batch, length]``); resumable.

  ``save``/``restore`` write and read this process's position under ``{directory}/process_{index}``,
  ``index`` being the shard this iterator reads (the process index unless set explicitly).
  """

  def __init__(self, dataset: tf.data.Dataset, shard_index: int) -> None:
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._shard_index = shard_index

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def _prefix(self, directory: str) -> str:
    return os.path.join(directory, f"process_{self._shard_index}", "iterator")

  def save(self, directory: str) -> None:
    self._checkpoint.write(self._prefix(directory))

  def restore(self, directory: str) -> None:
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + ".index"):
      raise FileNotFoundError(f"no data iterator position at {prefix} (saved by another number of "
                              "processes, or not a data checkpoint)")
    self._checkpoint.read(prefix).assert_consumed()


@gin.configurable
def make_data_iterator(mixture_or_task_name: str, sequence_length: int, global_batch_size: int,
                       split: str = "train", seed: int = 0, shuffle: bool = True,
                       num_epochs: int | None = None, pack: bool = True,
                       shard_index: int | None = None, num_shards: int | None = None,
                       use_cached: bool = False) -> DataIterator:
  """This process's batches of ``mixture_or_task_name`` (rows of ``sequence_length`` tokens).

  ``shard_index``/``num_shards`` default to the process index and count. ``num_epochs=None`` repeats
  forever; with a finite number the iterator ends after the last full batch. ``use_cached`` reads the
  tokenized tasks from seqio's offline cache (``seqio_cache_tasks``) instead of tokenizing on the fly.
  """
  if (shard_index is None) != (num_shards is None):
    raise ValueError("give both shard_index and num_shards, or neither")
  if num_shards is None:
    shard_index, num_shards = jax.process_index(), jax.process_count()
  if global_batch_size % num_shards:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by {num_shards} shards")
  local_batch_size = global_batch_size // num_shards
  dataset = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths={"targets": sequence_length},
      feature_converter=LlamaFeatureConverter(pack=pack), dataset_split=split,
      use_cached=use_cached, shuffle=shuffle, num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards), seed=seed,
      batch_size=local_batch_size)
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
  logging.info("data: %s split %s, shard %d/%d, %d rows of %d tokens per batch, seed %d",
               mixture_or_task_name, split, shard_index, num_shards, local_batch_size,
               sequence_length, seed)
  return DataIterator(dataset, shard_index)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh,
                 rules: partitioning.LogicalRules) -> dict[str, jax.Array]:
  """The global batch from every process's local rows, sharded like ``partitioning.batch_sharding``."""
  sharding = partitioning.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
