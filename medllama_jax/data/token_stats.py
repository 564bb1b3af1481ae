"""Token statistics of a prepared corpus folder, so mixing rates can be set in tokens.

seqio mixes examples, and a pre-training example is one chunk of a document (at most one row, see
:mod:`medllama_jax.data.preprocessors`), so a corpus's share of the trained tokens is its rate times its
mean tokens per example, which depends on its documents' lengths and on the row length ``L``. This module
records, per split, the exact histogram ``{n: documents of n tokens}`` of framed documents (what
``frame_documents`` makes: the tokenizer's prefix, the text, EOS), from which that mean follows for any
``L`` (:func:`tokens_per_example`). A histogram stays small at any corpus size: one entry per distinct
length.

The statistics live in ``{corpus_dir}/token_stats.json`` (written atomically), keyed by a fingerprint of
the tokenizer, so counts made with another tokenizer are never used::

  {"tokenizer": "<sha256>", "splits": {"train": {"documents": D, "tokens": T, "lengths": {"n": count}}}}

``scripts/count_tokens.py DATA_DIR/CORPUS --vocabulary MODEL_DIR`` writes it.
"""

from __future__ import annotations

import collections
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import tensorflow as tf
from absl import logging

from medllama_jax.data import records
from medllama_jax.data.vocab import TokenizerVocabulary

TOKEN_STATS_FILE = "token_stats.json"
BATCH_DOCUMENTS = 4096


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
  batch = []
  for text in texts:
    batch.append(text)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def length_histogram(texts: Iterable[str], vocabulary: TokenizerVocabulary) -> dict[int, int]:
  """``{n: count}`` of the framed documents' token counts: prefix + text + EOS, as ``frame_documents``."""
  framing = len(vocabulary.prefix_ids) + 1
  histogram = collections.Counter()
  for batch in _batches(texts, BATCH_DOCUMENTS):
    encoded = vocabulary.tokenizer.encode_batch(batch, add_special_tokens=False)
    histogram.update(len(ids) + framing for ids in encoded)
  return dict(sorted(histogram.items()))


def statistics(vocabulary: TokenizerVocabulary,
               histograms: Mapping[str, Mapping[int, int]]) -> dict[str, Any]:
  """The stored form of per-split length histograms counted with ``vocabulary``."""
  splits = {}
  for split, histogram in histograms.items():
    histogram = dict(sorted(histogram.items()))
    splits[split] = {"documents": sum(histogram.values()),
                     "tokens": sum(n * count for n, count in histogram.items()),
                     "lengths": {str(n): count for n, count in histogram.items()}}
  return {"tokenizer": vocabulary.fingerprint, "splits": splits}


def count_tokens(corpus_dir: str, vocabulary: TokenizerVocabulary) -> dict[str, Any]:
  """The token statistics of the prepared corpus ``corpus_dir`` (every split), as stored in the file."""
  return statistics(vocabulary, {
      split: length_histogram((r["text"] for r in records.read_records(pattern)), vocabulary)
      for split, pattern in records.split_file_patterns(corpus_dir).items()})


def write_token_stats(corpus_dir: str, vocabulary: TokenizerVocabulary) -> dict[str, Any]:
  """Counts ``corpus_dir``'s tokens and writes ``token_stats.json`` there; returns the statistics."""
  return _write(corpus_dir, count_tokens(corpus_dir, vocabulary))


def write_histograms(corpus_dir: str, vocabulary: TokenizerVocabulary,
                     histograms: Mapping[str, Mapping[int, int]]) -> dict[str, Any]:
  """Writes ``token_stats.json`` from histograms counted elsewhere (a Beam preparer's workers)."""
  return _write(corpus_dir, statistics(vocabulary, histograms))


def _write(corpus_dir: str, stats: dict[str, Any]) -> dict[str, Any]:
  path = os.path.join(corpus_dir, TOKEN_STATS_FILE)
  # A temporary name of its own: every training process may count a folder at once (token_stats).
  temporary = os.path.join(corpus_dir, f".{TOKEN_STATS_FILE}.{uuid.uuid4().hex}.incomplete")
  with tf.io.gfile.GFile(temporary, "w") as f:
    f.write(json.dumps(stats) + "\n")
  tf.io.gfile.rename(temporary, path, overwrite=True)
  return stats


def read_token_stats(corpus_dir: str, vocabulary: TokenizerVocabulary) -> dict[str, Any] | None:
  """The stored statistics of ``corpus_dir`` for this tokenizer; None if absent or for another one."""
  path = os.path.join(corpus_dir, TOKEN_STATS_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    stats = json.load(f)
  return stats if stats.get("tokenizer") == vocabulary.fingerprint else None


def token_stats(corpus_dir: str, vocabulary: TokenizerVocabulary) -> dict[str, Any]:
  """The statistics of ``corpus_dir`` for this tokenizer: read, or counted and written when missing.

  Counting on demand keeps a freshly prepared folder usable at once; for large corpora run
  ``scripts/count_tokens.py`` once beforehand (otherwise every training process counts at start).
  """
  stats = read_token_stats(corpus_dir, vocabulary)
  if stats is None:
    logging.info("%s: counting tokens for the mixing rates (no %s for this tokenizer yet; "
                 "scripts/count_tokens.py writes it ahead of training)",
                 os.path.basename(os.path.normpath(corpus_dir)), TOKEN_STATS_FILE)
    stats = write_token_stats(corpus_dir, vocabulary)
  return stats


def split_histogram(stats: Mapping[str, Any], split: str) -> dict[int, int]:
  """``{n: count}`` of one split of stored statistics."""
  return {int(n): count for n, count in stats["splits"][split]["lengths"].items()}


def tokens_per_example(histogram: Mapping[int, int], sequence_length: int) -> float:
  """Mean trained tokens per example of documents with these lengths, in rows of ``sequence_length``.

  A document of ``n >= 2`` tokens becomes ``c = ceil((n-1)/(L-1))`` chunks holding ``n + c - 1`` tokens;
  a chunk of ``m`` tokens fills ``m - 1`` positions of a row (input ``t_i``, target ``t_{i+1}``), so the
  document's chunks fill ``n - 1`` positions: the non-padding target tokens training sees, the unit of
  the mixture's token shares. Shorter documents yield nothing.
  """
  if sequence_length < 2:
    raise ValueError(f"sequence length {sequence_length}: a row needs at least 2 positions")
  stride = sequence_length - 1
  tokens = sum((n - 1) * count for n, count in histogram.items() if n >= 2)
  examples = sum(-(-(n - 1) // stride) * count for n, count in histogram.items() if n >= 2)
  if not examples:
    raise ValueError("no document of 2 tokens or more: the corpus yields no training example")
  return tokens / examples
