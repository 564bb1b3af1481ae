"""Streams corpus documents past the test n-grams and keeps what the report needs, nothing more.

Documents are read one at a time, their words hashed as they come; n-gram hashing and lookup (one
``np.searchsorted``) run on batches of about ``batch_words`` words, so numpy's per-call cost is
spread over many short documents. Memory is the batch (its documents and their word hashes), one
"found" flag per test n-gram per source, and the few best-matching documents per dataset. A
document overlaps when any of its n-grams is a test n-gram.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Iterable, Iterator

import numpy as np
from absl import logging

from medllama_jax.contamination import ngrams
from medllama_jax.contamination.eval_sets import EvalSetIndex
from medllama_jax.contamination.sources import CorpusDocument

PROGRESS_SECONDS = 60.0
LISTED_EXAMPLES = 20


@dataclasses.dataclass
class SourceTally:
  """One source's counts, and which test n-grams (positions in the index) it holds."""
  kind: str
  found: np.ndarray
  documents: int = 0
  words: int = 0
  ngrams: int = 0
  documents_with_overlap: int = 0


@dataclasses.dataclass(frozen=True)
class DocumentMatch:
  """A corpus document that shares ``shared_ngrams`` distinct n-grams with a dataset's examples
  (``examples``: their indices, at most :data:`LISTED_EXAMPLES`, of ``num_examples``)."""
  source: str
  id: str
  shared_ngrams: int
  examples: tuple[int, ...]
  num_examples: int


class Scanner:
  """Looks the documents of each source up in ``index``; :meth:`scan` yields each document with
  whether it overlaps, after counting it in :attr:`tallies` and :attr:`top_documents`."""

  def __init__(self, index: EvalSetIndex, top_documents: int = 10, batch_words: int = 1 << 18):
    if top_documents < 0 or batch_words < 1:
      raise ValueError(f"need top_documents >= 0 and batch_words >= 1, got {top_documents}, "
                       f"{batch_words}")
    self.index = index
    self.batch_words = batch_words
    self.keep_top = top_documents
    self.tallies: dict[str, SourceTally] = {}
    # Per dataset: a min-heap of (shared n-grams, -arrival, DocumentMatch), the best kept.
    self._top: list[list[tuple[int, int, DocumentMatch]]] = [[] for _ in index.datasets]
    self._arrivals = 0

  def scan(self, source: str, kind: str, documents: Iterable[CorpusDocument]
           ) -> Iterator[tuple[CorpusDocument, bool]]:
    if source in self.tallies:
      raise ValueError(f"corpus source {source} given twice")
    tally = self.tallies[source] = SourceTally(kind, np.zeros(len(self.index.hashes), bool))
    batch: list[tuple[CorpusDocument, np.ndarray, np.ndarray]] = []
    pending = 0
    start = last_log = time.monotonic()
    for document in documents:
      word_hashes, lengths = ngrams.encode(document.texts)
      tally.documents += 1
      tally.words += len(word_hashes)
      batch.append((document, word_hashes, lengths))
      pending += len(word_hashes) + 1
      if pending >= self.batch_words:
        yield from self._lookup(source, tally, batch)
        batch, pending = [], 0
      if time.monotonic() - last_log >= PROGRESS_SECONDS:
        last_log = time.monotonic()
        _log_progress(source, tally, last_log - start)
    yield from self._lookup(source, tally, batch)
    _log_progress(source, tally, time.monotonic() - start)

  def _lookup(self, source: str, tally: SourceTally,
              batch: list[tuple[CorpusDocument, np.ndarray, np.ndarray]]
              ) -> Iterator[tuple[CorpusDocument, bool]]:
    """Hashes and looks up a batch of documents; yields each with whether it overlaps."""
    if not batch:
      return
    lengths = np.concatenate([lengths for *_, lengths in batch])
    hashes = ngrams.ngram_hashes(np.concatenate([h for _, h, _ in batch]), lengths, self.index.n)
    tally.ngrams += len(hashes)
    positions, found = self.index.lookup(hashes)
    per_text = ngrams.ngram_counts(lengths, self.index.n)
    ends = np.concatenate([[0], np.cumsum(per_text)])[np.cumsum([len(l) for *_, l in batch])]
    begins = np.concatenate([[0], ends[:-1]])
    found_before = np.concatenate([[0], np.cumsum(found)])
    for (document, *_), begin, end in zip(batch, begins, ends):
      overlaps = bool(found_before[end] > found_before[begin])
      if overlaps:
        matched = np.unique(positions[begin:end][found[begin:end]])
        tally.found[matched] = True
        tally.documents_with_overlap += 1
        self._rank(source, document.id, matched)
      yield document, overlaps

  def _rank(self, source: str, document_id: str, matched: np.ndarray) -> None:
    """Offers the document to the top list of every dataset it shares n-grams with."""
    if not self.keep_top:
      return
    positions, examples = self.index.holders(matched)
    example_datasets = self.index.example_dataset[examples]
    self._arrivals += 1
    for dataset in np.unique(example_datasets):
      mine = example_datasets == dataset
      indices = np.unique(self.index.example_index[examples[mine]])
      match = DocumentMatch(source, document_id, len(np.unique(positions[mine])),
                            tuple(int(i) for i in indices[:LISTED_EXAMPLES]), len(indices))
      entry = (match.shared_ngrams, -self._arrivals, match)
      top = self._top[dataset]
      if len(top) < self.keep_top:
        heapq.heappush(top, entry)
      elif entry[:2] > top[0][:2]:
        heapq.heapreplace(top, entry)

  def top_documents(self, dataset: int) -> list[DocumentMatch]:
    """The documents sharing the most n-grams with ``dataset`` (by position), best first; ties in
    the order they were read."""
    return [match for *_, match in sorted(self._top[dataset], key=lambda e: e[:2], reverse=True)]


def _log_progress(source: str, tally: SourceTally, seconds: float) -> None:
  rate = 1 / max(seconds, 1e-9)
  logging.info("%s: %d documents (%.0f/s), %d words (%.0f/s), %d overlapping", source,
               tally.documents, tally.documents * rate, tally.words, tally.words * rate,
               tally.documents_with_overlap)


def example_coverage(index: EvalSetIndex, found: np.ndarray) -> np.ndarray:
  """How many of each example's distinct n-grams are among the ``found`` test n-grams."""
  hits = found[index.pair_hashes()]
  return np.bincount(index.owners[hits], minlength=len(index.example_dataset))
