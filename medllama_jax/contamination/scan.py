"""Streams corpus documents past the test n-grams and keeps what the report needs, nothing more.

Documents are read one at a time, their words hashed as they come; n-gram hashing and lookup (one
``np.searchsorted``) run on batches of about ``batch_words`` words, so numpy's per-call cost is
spread over many short documents. Memory is the batch (its documents and their word hashes), one
"found" flag per test n-gram per source, and the few best-matching documents per dataset. A
document overlaps when any of its n-grams is a test n-gram. :func:`scan_documents` is the one pass
both scans run: :class:`Scanner` over whole sources in this process, ``beam_scan`` over each file on
a worker, whose tallies and top lists then :meth:`SourceTally.merge` and :meth:`TopDocuments.merge`.
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


Position = tuple[int, ...]


@dataclasses.dataclass
class SourceTally:
  """One source's counts, and which test n-grams (positions in the index) it holds."""
  kind: str
  found: np.ndarray
  documents: int = 0
  words: int = 0
  ngrams: int = 0
  documents_with_overlap: int = 0

  @classmethod
  def empty(cls, kind: str, index: EvalSetIndex) -> SourceTally:
    """Nothing read yet, against ``index``."""
    return cls(kind, np.zeros(len(index.hashes), bool))

  def merge(self, other: SourceTally) -> SourceTally:
    """Adds the counts of ``other`` (another part of the same source) to these; returns self."""
    self.found |= other.found
    self.documents += other.documents
    self.words += other.words
    self.ngrams += other.ngrams
    self.documents_with_overlap += other.documents_with_overlap
    return self


@dataclasses.dataclass(frozen=True)
class DocumentMatch:
  """A corpus document that shares ``shared_ngrams`` distinct n-grams with a dataset's examples
  (``examples``: their indices, at most :data:`LISTED_EXAMPLES`, of ``num_examples``)."""
  source: str
  id: str
  shared_ngrams: int
  examples: tuple[int, ...]
  num_examples: int


class TopDocuments:
  """The ``keep`` documents sharing the most n-grams with each dataset; among equals, the one read
  first wins. "First" is the document's :data:`Position`, a tuple ordered as the documents are
  read, so parts of a scan made apart (the Beam scan's files) :meth:`merge` into what one pass in
  read order keeps."""

  def __init__(self, num_datasets: int, keep: int):
    self.keep = keep
    # Per dataset: a min-heap of (shared n-grams, negated position, DocumentMatch), the best kept.
    self._heaps: list[list[tuple[int, Position, DocumentMatch]]] = [[] for _ in range(num_datasets)]

  def offer(self, dataset: int, position: Position, match: DocumentMatch) -> None:
    entry = (match.shared_ngrams, tuple(-p for p in position), match)
    heap = self._heaps[dataset]
    if len(heap) < self.keep:
      heapq.heappush(heap, entry)
    elif heap and entry[:2] > heap[0][:2]:
      heapq.heapreplace(heap, entry)

  def merge(self, other: TopDocuments) -> TopDocuments:
    """Offers every document ``other`` kept; returns self."""
    for dataset, heap in enumerate(other._heaps):
      for shared, negated, match in heap:
        self.offer(dataset, tuple(-p for p in negated), match)
    return self

  def best(self, dataset: int) -> list[DocumentMatch]:
    """The documents kept for ``dataset`` (by position), best first; ties in the order read."""
    return [match for *_, match in sorted(self._heaps[dataset], key=lambda e: e[:2], reverse=True)]


def document_matches(index: EvalSetIndex, source: str, document_id: str, matched: np.ndarray
                     ) -> Iterator[tuple[int, DocumentMatch]]:
  """Per dataset the document shares n-grams with (``matched``: their positions in the index),
  the dataset's number and how the document matches it."""
  positions, examples = index.holders(matched)
  example_datasets = index.example_dataset[examples]
  for dataset in np.unique(example_datasets):
    mine = example_datasets == dataset
    indices = np.unique(index.example_index[examples[mine]])
    yield int(dataset), DocumentMatch(source, document_id, len(np.unique(positions[mine])),
                                      tuple(int(i) for i in indices[:LISTED_EXAMPLES]),
                                      len(indices))


def scan_documents(index: EvalSetIndex, source: str, documents: Iterable[tuple[Position,
                                                                             CorpusDocument]],
                   tally: SourceTally, top: TopDocuments, batch_words: int
                   ) -> Iterator[tuple[CorpusDocument, bool]]:
  """Looks ``documents`` (each with its position) up in ``index``, counting them in ``tally`` and
  ``top``; yields each document with whether it overlaps. One pass of one source, or of one file
  of it: what the single-process and the Beam scan both run."""
  batch: list[tuple[Position, CorpusDocument, np.ndarray, np.ndarray]] = []
  pending = 0
  start = last_log = time.monotonic()
  for position, document in documents:
    word_hashes, lengths = ngrams.encode(document.texts)
    tally.documents += 1
    tally.words += len(word_hashes)
    batch.append((position, document, word_hashes, lengths))
    pending += len(word_hashes) + 1
    if pending >= batch_words:
      yield from _lookup(index, source, tally, top, batch)
      batch, pending = [], 0
    if time.monotonic() - last_log >= PROGRESS_SECONDS:
      last_log = time.monotonic()
      _log_progress(source, tally, last_log - start)
  yield from _lookup(index, source, tally, top, batch)
  _log_progress(source, tally, time.monotonic() - start)


def _lookup(index: EvalSetIndex, source: str, tally: SourceTally, top: TopDocuments,
            batch: list[tuple[Position, CorpusDocument, np.ndarray, np.ndarray]]
            ) -> Iterator[tuple[CorpusDocument, bool]]:
  """Hashes and looks up a batch of documents; yields each with whether it overlaps."""
  if not batch:
    return
  lengths = np.concatenate([lengths for *_, lengths in batch])
  hashes = ngrams.ngram_hashes(np.concatenate([h for *_, h, _ in batch]), lengths, index.n)
  tally.ngrams += len(hashes)
  positions, found = index.lookup(hashes)
  per_text = ngrams.ngram_counts(lengths, index.n)
  texts_per_document = [len(text_lengths) for *_, text_lengths in batch]
  ends = np.concatenate([[0], np.cumsum(per_text)])[np.cumsum(texts_per_document)]
  begins = np.concatenate([[0], ends[:-1]])
  found_before = np.concatenate([[0], np.cumsum(found)])
  for (position, document, *_), begin, end in zip(batch, begins, ends):
    overlaps = bool(found_before[end] > found_before[begin])
    if overlaps:
      matched = np.unique(positions[begin:end][found[begin:end]])
      tally.found[matched] = True
      tally.documents_with_overlap += 1
      if top.keep:
        for dataset, match in document_matches(index, source, document.id, matched):
          top.offer(dataset, position, match)
    yield document, overlaps


def check_settings(top_documents: int, batch_words: int) -> None:
  """Raises ValueError for settings no scan can run with."""
  if top_documents < 0 or batch_words < 1:
    raise ValueError(f"need top_documents >= 0 and batch_words >= 1, got {top_documents}, "
                     f"{batch_words}")


class Scanner:
  """Looks the documents of each source up in ``index``; :meth:`scan` yields each document with
  whether it overlaps, after counting it in :attr:`tallies` and :attr:`top`."""

  def __init__(self, index: EvalSetIndex, top_documents: int = 10, batch_words: int = 1 << 18):
    check_settings(top_documents, batch_words)
    self.index = index
    self.batch_words = batch_words
    self.tallies: dict[str, SourceTally] = {}
    self.top = TopDocuments(len(index.datasets), top_documents)

  def scan(self, source: str, kind: str, documents: Iterable[CorpusDocument]
           ) -> Iterator[tuple[CorpusDocument, bool]]:
    """Documents are positioned (source number, number read), so ties rank in read order."""
    if source in self.tallies:
      raise ValueError(f"corpus source {source} given twice")
    number = len(self.tallies)
    tally = self.tallies[source] = SourceTally.empty(kind, self.index)
    yield from scan_documents(self.index, source,
                              (((number, read), d) for read, d in enumerate(documents)),
                              tally, self.top, self.batch_words)

  def top_documents(self, dataset: int) -> list[DocumentMatch]:
    """The documents sharing the most n-grams with ``dataset`` (by position), best first; ties in
    the order they were read."""
    return self.top.best(dataset)


def _log_progress(source: str, tally: SourceTally, seconds: float) -> None:
  rate = 1 / max(seconds, 1e-9)
  logging.info("%s: %d documents (%.0f/s), %d words (%.0f/s), %d overlapping", source,
               tally.documents, tally.documents * rate, tally.words, tally.words * rate,
               tally.documents_with_overlap)


def example_coverage(index: EvalSetIndex, found: np.ndarray) -> np.ndarray:
  """How many of each example's distinct n-grams are among the ``found`` test n-grams."""
  hits = found[index.pair_hashes()]
  return np.bincount(index.owners[hits], minlength=len(index.example_dataset))
