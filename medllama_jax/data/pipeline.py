"""The trainer's input: batches from a seqio task or mixture, cut into data shards, resumable.

The data is cut into ``num_shards`` shards (``seqio.ShardInfo``: seqio splits the files of each
corpus, or its examples when a corpus has fewer files than shards), and shard ``i`` supplies rows
``[i * B / num_shards, (i + 1) * B / num_shards)`` of every global batch of ``B`` rows. Each process
reads a run of consecutive shards (process ``p`` of ``P``: shards ``p * num_shards / P`` onwards) and
:func:`global_batch` stitches the processes' rows into arrays sharded over the data-parallel mesh
axes. So the global batch depends on ``num_shards``, never on how many processes read it: one process
reading both shards of a 2-shard run sees exactly the batches two processes see together (given a
mesh whose batch blocks follow the process order, as ``partitioning.make_mesh`` lays out CPU and GPU
devices).

Each shard's stream is a pure function of the seed: tf.data runs deterministically, and seqio's file
shuffles, example shuffles and mixture sampling are seeded. Its position is saved the way t5x does,
with ``tf.train.Checkpoint`` of the tf.data iterator (shuffle buffers and the sampler state included),
one folder per shard, so a restored iterator yields exactly the batches the original would have
yielded, whichever process count wrote or reads it, as long as ``num_shards`` is the same.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from jax.sharding import Mesh

from medllama_jax import partitioning, progress
from medllama_jax.data.feature_converter import LlamaFeatureConverter


def shard_folder(index: int, num_shards: int) -> str:
  """Where the position of shard ``index`` of ``num_shards`` lives inside a data checkpoint."""
  return f"shard_{index}-of-{num_shards}"


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The consecutive shards process ``process_index`` of ``process_count`` reads."""
  if num_shards < 1 or num_shards % process_count:
    raise ValueError(f"{num_shards} data shards cannot be split evenly over {process_count} "
                     "processes: make make_data_iterator.num_shards a multiple of the process count")
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class DataIterator:
  """Batches as numpy dicts (the five ``decoder_*`` features, ``[local_batch, length]``); resumable.

  ``local_batch`` is the rows of this process's shards, concatenated in shard order. ``save`` and
  ``restore`` write and read each shard's position under ``{directory}/shard_{i}-of-{num_shards}``.
  """

  def __init__(self, datasets: Sequence[tf.data.Dataset], shards: Sequence[int],
               num_shards: int) -> None:
    if len(datasets) != len(shards) or not shards:
      raise ValueError(f"{len(datasets)} datasets for shards {list(shards)}")
    self._iterators = [iter(dataset) for dataset in datasets]
    self._checkpoints = [tf.train.Checkpoint(iterator=it) for it in self._iterators]
    self._shards = tuple(shards)
    self._num_shards = num_shards

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(iterator) for iterator in self._iterators]
    return {k: np.concatenate([part[k].numpy() for part in parts]) for k in parts[0]}

  def _prefix(self, directory: str, shard: int) -> str:
    return os.path.join(directory, shard_folder(shard, self._num_shards), "iterator")

  def save(self, directory: str) -> None:
    for shard, checkpoint in zip(self._shards, self._checkpoints):
      checkpoint.write(self._prefix(directory, shard))

  def restore(self, directory: str) -> None:
    """Moves every shard to its saved position; a position saved with another number of shards is
    refused (reading it would silently start the data over or skip examples)."""
    for shard, checkpoint in zip(self._shards, self._checkpoints):
      prefix = self._prefix(directory, shard)
      if not tf.io.gfile.exists(prefix + ".index"):
        raise FileNotFoundError(self._missing_position_message(directory, prefix))
      checkpoint.read(prefix).assert_consumed()

  def _missing_position_message(self, directory: str, prefix: str) -> str:
    saved = sorted(os.path.basename(path) for path in
                   tf.io.gfile.glob(os.path.join(directory, "shard_*-of-*")))
    counts = sorted({int(name.rsplit("-of-", 1)[1]) for name in saved})
    if counts and self._num_shards not in counts:
      return (f"the data position in {directory} was saved for {counts[0]} data shards "
              f"({', '.join(saved)}), but this run reads {self._num_shards}: bind "
              f"make_data_iterator.num_shards = {counts[0]} (a multiple of the process count) "
              "to resume it")
    return f"no data iterator position at {prefix} (not a data checkpoint, or an incomplete one)"


@gin.configurable
def make_data_iterator(mixture_or_task_name: str, sequence_length: int, global_batch_size: int,
                       split: str = "train", seed: int = 0, shuffle: bool = True,
                       num_epochs: int | None = None, pack: bool = True,
                       shard_index: int | None = None, num_shards: int | None = None,
                       use_cached: bool = False, cache_dirs: Sequence[str] = ()) -> DataIterator:
  """This process's batches of ``mixture_or_task_name`` (rows of ``sequence_length`` tokens).

  ``num_shards`` (default: the process count) data shards of ``global_batch_size / num_shards`` rows
  each; this process reads its own run of them (``process_shards``), or only ``shard_index`` when
  given (tools and tests). Bind ``num_shards`` in a recipe to keep the batches, and the saved data
  position, independent of the number of processes. ``num_epochs=None`` repeats forever; with a
  finite number the iterator ends after the last full batch of a shard. ``use_cached`` reads the
  tokenized tasks from seqio's offline cache (``seqio_cache_tasks``) instead of tokenizing on the
  fly; seqio finds a Task's cache in its global cache folders, to which ``cache_dirs`` (the
  ``--output_cache_dir`` of ``seqio_cache_tasks``) are added: without them the trainer, which does
  not run ``seqio_cache_tasks``'s ``main``, would know of none.
  """
  if shard_index is not None and num_shards is None:
    raise ValueError("shard_index needs num_shards")
  if num_shards is None:
    num_shards = jax.process_count()
  if shard_index is None:
    shards = process_shards(num_shards, jax.process_index(), jax.process_count())
  elif 0 <= shard_index < num_shards:
    shards = range(shard_index, shard_index + 1)
  else:
    raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
  if global_batch_size % num_shards:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by {num_shards} shards")
  rows_per_shard = global_batch_size // num_shards
  seqio.add_global_cache_dirs(list(cache_dirs))
  options = tf.data.Options()
  options.deterministic = True
  datasets = [
      seqio.get_dataset(
          mixture_or_task_name, task_feature_lengths={"targets": sequence_length},
          feature_converter=LlamaFeatureConverter(pack=pack), dataset_split=split,
          use_cached=use_cached, shuffle=shuffle, num_epochs=num_epochs,
          shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards), seed=seed,
          batch_size=rows_per_shard).with_options(options).prefetch(tf.data.AUTOTUNE)
      for shard in shards]
  logging.info("data: %s split %s, shards %d-%d of %d, %d rows of %d tokens per shard and batch, "
               "seed %d", mixture_or_task_name, split, shards[0], shards[-1], num_shards,
               rows_per_shard, sequence_length, seed, extra=progress.FILE_ONLY)
  return DataIterator(datasets, shards, num_shards)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh,
                 rules: partitioning.LogicalRules) -> dict[str, jax.Array]:
  """The global batch from every process's local rows, sharded like ``partitioning.batch_sharding``."""
  sharding = partitioning.batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
