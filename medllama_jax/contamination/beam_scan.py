"""The contamination scan as an Apache Beam pipeline (``medllama-contamination --runner ...``).

The test n-gram index is small: the driver builds it, saves it once to the pipeline's shared folder
(below) and every worker loads it when its scanning step starts (``DoFn.setup``); it is not put in
the job graph, which a runner limits in size (Dataflow: a few MB; the index can be hundreds). The
corpora are large: every file of every source (a shard of a prepared corpus, an instruction
file, a raw input file) is one unit of work, read on a worker with the source's own reader
(``sources.file_documents``) and looked up with the single-process scan's own pass
(``scan.scan_documents``). Each file gives a :class:`ScanPart` (per-source tallies, the best
matching documents, rejected records, documents removed per split); the parts merge into one, which
the driver reads back and turns into the same report as the single-process scan. Documents carry
their position (source, file, record), so ties among the best matching documents are broken in
read order, as in one pass.

Decontaminated copies: the kept documents of each split are grouped on one worker, put back in
read order and dealt into the shards by ``DecontaminatedCopy.write_split``, so the shard files are
those the single-process run writes; the driver writes ``stats.json`` last. One split's kept
records pass through that worker's memory.

The index goes out and results come back through files in one folder: under ``--temp_location``
when given (a cluster runner needs a folder its workers and the driver share, e.g. ``gs://...``),
else a local temporary folder (DirectRunner). The driver removes them when the run ends.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import pickle
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from absl import logging
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from medllama_jax.contamination.decontaminate import DecontaminatedCopy
from medllama_jax.contamination.eval_sets import EvalSetIndex
from medllama_jax.contamination.scan import (
  Position,
  SourceTally,
  TopDocuments,
  check_settings,
  scan_documents,
)
from medllama_jax.contamination.sources import CorpusDocument, CorpusSource, SourceFile
from medllama_jax.data import instruct

_KEPT = "kept"
_INDEX, _SCAN_RESULT, _SHARD_COUNTS = "index.pickle", "scan.pickle", "shard_counts.pickle"


@dataclasses.dataclass
class ScanPart:
  """What the scan of some files keeps; parts of one scan :meth:`merge` into the whole.

  ``rejected``: per source, malformed records by reason; ``removed``: per copied corpus, the
  overlapping documents per split."""
  tallies: dict[str, SourceTally]
  top: TopDocuments
  rejected: dict[str, collections.Counter[str]]
  removed: dict[str, collections.Counter[str]]

  def merge(self, other: ScanPart) -> ScanPart:
    """Adds ``other`` (which it may share objects with from now on) to this part; returns self."""
    for name, tally in other.tallies.items():
      if name in self.tallies:
        self.tallies[name].merge(tally)
      else:
        self.tallies[name] = tally
    self.top.merge(other.top)
    for mine, theirs in ((self.rejected, other.rejected), (self.removed, other.removed)):
      for name, counts in theirs.items():
        mine.setdefault(name, collections.Counter()).update(counts)
    return self


@dataclasses.dataclass(frozen=True)
class _FileTask:
  """One file to scan, with the numbers that position its documents in read order."""
  source_number: int
  file_number: int
  source: CorpusSource
  file: SourceFile


class _ScanFile(beam.DoFn):
  """Scans one file: yields its :class:`ScanPart`, and on the ``kept`` output, for a corpus being
  copied, ``((corpus, split), (position, document))`` for every document that does not overlap."""

  def __init__(self, index_path: str, top_documents: int, batch_words: int,
               copied: frozenset[str]):
    self._index_path = index_path
    self._top_documents = top_documents
    self._batch_words = batch_words
    self._copied = copied
    self._index: EvalSetIndex | None = None

  def setup(self) -> None:
    self._index = _load(self._index_path)

  def process(self, task: _FileTask) -> Iterator[Any]:
    index = self._index
    name = task.source.name
    tally = SourceTally(task.source.kind, np.zeros(len(index.hashes), bool))
    top = TopDocuments(len(index.datasets), self._top_documents)
    rejections = instruct.Rejections()
    documents = task.source.file_documents(task.file, rejections)
    positioned = (((task.source_number, task.file_number, record), document)
                  for record, document in enumerate(documents))
    scanned = scan_documents(index, name, positioned, tally, top,
                             self._batch_words)
    copied = name in self._copied
    for record, (document, overlaps) in enumerate(scanned):
      if copied and not overlaps:
        position = (task.source_number, task.file_number, record)
        yield beam.pvalue.TaggedOutput(_KEPT, ((name, document.split), (position, document)))
    removed = ({name: collections.Counter({task.file.split: tally.documents_with_overlap})}
               if copied else {})
    yield ScanPart({name: tally}, top, {name: collections.Counter(rejections.counts)}, removed)


class _MergeParts(beam.CombineFn):
  """The :class:`ScanPart` of every file merged into one (None when there is no file)."""

  def create_accumulator(self) -> ScanPart | None:
    return None

  def add_input(self, merged: ScanPart | None, part: ScanPart) -> ScanPart:
    part = copy.deepcopy(part)  # Elements are Beam's: never mutated.
    return part if merged is None else merged.merge(part)

  def merge_accumulators(self, accumulators: Iterable[ScanPart | None]) -> ScanPart | None:
    merged = None
    for part in accumulators:
      if part is not None:
        merged = part if merged is None else merged.merge(part)
    return merged

  def extract_output(self, merged: ScanPart | None) -> ScanPart | None:
    return merged


def _write_split(group: tuple[tuple[str, str], Iterable[tuple[Position, CorpusDocument]]],
                 copies: Mapping[str, DecontaminatedCopy]
                 ) -> tuple[tuple[str, str], list[int]]:
  """Writes one split of a copy from its kept documents, put back in read order."""
  (name, split), kept = group
  documents = [document for _, document in sorted(kept, key=lambda item: item[0])]
  return (name, split), copies[name].write_split(split, documents)


def _save(value: Any, path: str) -> None:
  with FileSystems.create(path) as f:
    f.write(pickle.dumps(value))


def _load(path: str) -> Any:
  with FileSystems.open(path) as f:
    return pickle.loads(f.read())


def _work_dir(options: PipelineOptions) -> str:
  temp_location = options.view_as(GoogleCloudOptions).temp_location
  if temp_location:
    return FileSystems.join(temp_location, f"medllama-contamination-{uuid.uuid4().hex}")
  return tempfile.mkdtemp(prefix="medllama-contamination-")


def _remove(work_dir: str, paths: Iterable[str]) -> None:
  FileSystems.delete([path for path in paths if FileSystems.exists(path)])
  if os.path.isdir(work_dir):  # A local folder; object stores have none to remove.
    os.rmdir(work_dir)


def _build(pipeline: beam.Pipeline, sources: Sequence[CorpusSource], top_documents: int,
           batch_words: int, copies: Mapping[str, DecontaminatedCopy], work_dir: str) -> None:
  """The pipeline: files scanned in parallel, parts merged, kept documents written per split."""
  tasks = [_FileTask(source_number, file_number, source, file)
           for source_number, source in enumerate(sources)
           for file_number, file in enumerate(source.files())]
  scanned = (pipeline
             | "Files" >> beam.Create(tasks)
             | "Spread" >> beam.Reshuffle()
             | "Scan" >> beam.ParDo(_ScanFile(FileSystems.join(work_dir, _INDEX), top_documents,
                                              batch_words, frozenset(copies)))
             .with_outputs(_KEPT, main="parts"))
  _ = (scanned.parts
       | "Merge" >> beam.CombineGlobally(_MergeParts())
       | "SaveScan" >> beam.Map(_save, FileSystems.join(work_dir, _SCAN_RESULT)))
  if copies:
    _ = (scanned[_KEPT]
         | "GroupSplits" >> beam.GroupByKey()
         | "WriteSplits" >> beam.Map(_write_split, copies)
         | "ShardCounts" >> beam.combiners.ToList()
         | "SaveCounts" >> beam.Map(_save, FileSystems.join(work_dir, _SHARD_COUNTS)))


def _empty(sources: Sequence[CorpusSource], index: EvalSetIndex, top_documents: int,
           copies: Mapping[str, DecontaminatedCopy]) -> ScanPart:
  """Zero counts for every source in the order given (the report's order), every copied split."""
  return ScanPart(
      {s.name: SourceTally(s.kind, np.zeros(len(index.hashes), bool)) for s in sources},
      TopDocuments(len(index.datasets), top_documents),
      {s.name: collections.Counter() for s in sources},
      {name: collections.Counter({split: 0 for split in c.corpus.file_patterns})
       for name, c in copies.items()})


def _finish_copies(copies: Mapping[str, DecontaminatedCopy],
                   shard_counts: Sequence[tuple[tuple[str, str], list[int]]],
                   removed: Mapping[str, Mapping[str, int]], provenance: Mapping[str, Any]
                   ) -> dict[str, dict[str, Any]]:
  """Writes the empty shards of splits with nothing kept and every copy's ``stats.json``."""
  written = dict(shard_counts)
  stats = {}
  for name, copied in copies.items():
    counts = {split: written[name, split] if (name, split) in written
              else copied.write_split(split, []) for split in copied.corpus.file_patterns}
    stats[name] = copied.finish(counts, dict(removed[name]), provenance)
  return stats


def run_scan(sources: Sequence[CorpusSource], index: EvalSetIndex, top_documents: int,
             batch_words: int, copies: Mapping[str, DecontaminatedCopy],
             provenance: Mapping[str, Any], options: PipelineOptions
             ) -> tuple[ScanPart, dict[str, dict[str, Any]]]:
  """Runs the scan on Beam; returns the merged scan and each copy's ``stats.json``."""
  check_settings(top_documents, batch_words)
  work_dir = _work_dir(options)
  paths = {name: FileSystems.join(work_dir, name) for name in (_INDEX, _SCAN_RESULT, _SHARD_COUNTS)}
  logging.info("Beam scan of %d sources; the index and results pass through %s", len(sources),
               work_dir)
  _save(index, paths[_INDEX])
  try:
    with beam.Pipeline(options=options) as pipeline:
      _build(pipeline, sources, top_documents, batch_words, copies, work_dir)
    scanned = _load(paths[_SCAN_RESULT])
    shard_counts = _load(paths[_SHARD_COUNTS]) if copies else []
  finally:
    _remove(work_dir, paths.values())
  merged = _empty(sources, index, top_documents, copies)
  if scanned is not None:
    merged.merge(scanned)
  return merged, _finish_copies(copies, shard_counts, merged.removed, provenance)
