"""The test side: every n-gram of the MIBE evaluation sets, sorted, with the examples that hold it.

Which text of an example: every text field of its record (``medllama_jax.eval.datasets``: the
question, passages, options, premise and hypothesis, findings, article, tokens... and ``answer``,
the text the model should write), each field on its own (a list field such as PubMedQA's contexts or
MedQA's options is joined with spaces, in the order the prompt shows it). Left out: ``gold`` (the
scorer's copy of the answer) and the prompt template. The template is the same for every example,
so a corpus quoting it (instruction data written in the release's style) would otherwise mark
every example of the dataset.

Short texts: a field with fewer than ``n`` words has no n-grams and is skipped (matching shorter
sequences would need every shorter length hashed on the corpus side, and a label such as "yes" or
"Cardiology" matches everything). An example none of whose fields reaches ``n`` words cannot be
found contaminated; the report counts such examples.

Why a sorted array and no Bloom filter: the test sets are small (MIBE's largest, the PubMed
summarization articles, come to tens of millions of n-grams, a few hundred MB here) and the corpora
are large, so the small side is held exactly in memory and the corpus is streamed past it, each
document's hashes looked up with ``np.searchsorted``. Nothing of the corpus is kept, whatever its
size; a Bloom filter would only be needed to hold the corpus side (corpus-against-corpus
deduplication), and it would add false positives this exact set does not have.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from medllama_jax.contamination import ngrams
from medllama_jax.eval import datasets as mibe_datasets

_NOT_TEXT = ("gold",)


def record_texts(record: Mapping[str, Any]) -> list[str]:
  """The texts of one evaluation record that are checked (module docstring)."""
  texts = []
  for key, value in record.items():
    if key in _NOT_TEXT:
      continue
    if isinstance(value, str):
      texts.append(value)
    elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
      texts.append(" ".join(value))
  return texts


@dataclasses.dataclass(frozen=True)
class EvalSetIndex:
  """The distinct n-gram hashes of the evaluation examples and who holds them.

  ``hashes`` (uint64, sorted, unique); ``owners[offsets[u]:offsets[u + 1]]``: the examples (global
  ids, ascending) holding ``hashes[u]``. Example ``e`` is number ``example_index[e]`` of dataset
  ``datasets[example_dataset[e]]`` (its ``index`` in medllama-eval's predictions) and has
  ``example_ngrams[e]`` distinct n-grams.
  """
  n: int
  datasets: tuple[str, ...]
  hashes: np.ndarray
  offsets: np.ndarray
  owners: np.ndarray
  example_dataset: np.ndarray
  example_index: np.ndarray
  example_ngrams: np.ndarray

  def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``hashes``: its position in :attr:`hashes` (meaningful where found), found."""
    positions = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
    return positions, self.hashes[positions] == hashes

  def holders(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (hash position, example) pair for the hashes at ``positions``."""
    starts = self.offsets[positions]
    lengths = self.offsets[positions + 1] - starts
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pairs = np.repeat(starts, lengths) + np.arange(lengths.sum()) - first
    return np.repeat(positions, lengths), self.owners[pairs]

  def pair_hashes(self) -> np.ndarray:
    """The hash position of every entry of :attr:`owners`."""
    return np.repeat(np.arange(len(self.hashes)), np.diff(self.offsets))


def build_index(examples: Mapping[str, Sequence[Sequence[str]]], n: int) -> EvalSetIndex:
  """``{dataset: [texts of each example]}`` → the index of their n-grams."""
  if n < 1:
    raise ValueError(f"n={n}: n-grams need n >= 1")
  pair_hashes, pair_examples, example_dataset, example_index, example_ngrams = [], [], [], [], []
  for number, (dataset, texts_per_example) in enumerate(examples.items()):
    for index, texts in enumerate(texts_per_example):
      example = len(example_dataset)
      hashes = np.unique(ngrams.texts_ngram_hashes(texts, n))
      pair_hashes.append(hashes)
      pair_examples.append(np.full(len(hashes), example, np.int32))
      example_dataset.append(number)
      example_index.append(index)
      example_ngrams.append(len(hashes))
  all_hashes = np.concatenate(pair_hashes or [np.zeros(0, np.uint64)])
  all_examples = np.concatenate(pair_examples or [np.zeros(0, np.int32)])
  if not len(all_hashes):
    raise ValueError(f"no evaluation example of {list(examples)} has a text of {n} words or more: "
                     "there is nothing to look for (choose a smaller n)")
  order = np.lexsort((all_examples, all_hashes))
  sorted_hashes = all_hashes[order]
  unique, starts = np.unique(sorted_hashes, return_index=True)
  return EvalSetIndex(
      n=n, datasets=tuple(examples), hashes=unique,
      offsets=np.append(starts, len(sorted_hashes)).astype(np.int64), owners=all_examples[order],
      example_dataset=np.asarray(example_dataset, np.int32),
      example_index=np.asarray(example_index, np.int32),
      example_ngrams=np.asarray(example_ngrams, np.int64))


def load_index(data_dir: str, datasets: Sequence[str], n: int) -> EvalSetIndex:
  """The index of the evaluation sets of ``datasets``, read from ``{data_dir}/{dataset}/`` as
  medllama-eval reads them."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"MIBE data folder {data_dir} does not exist")
  examples = {}
  for dataset in datasets:
    records = mibe_datasets.read_records(dataset, os.path.join(data_dir, dataset))
    examples[dataset] = [record_texts(record) for record in records]
  index = build_index(examples, n)
  logging.info("%d-grams of %d evaluation examples (%s): %d distinct", n,
               len(index.example_dataset), ", ".join(datasets), len(index.hashes))
  return index
