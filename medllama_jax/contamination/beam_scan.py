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

Decontaminated copies are written as the Beam corpus preparer (``medllama_jax.data.beam_prepare``)
writes its shards, with its functions: the single process deals each split's kept documents
round-robin in read order, so a document's shard is its rank in its split modulo the shard count;
the rank is the number of documents kept from earlier files (a small table of per-file counts, a
side input) plus its rank in its own file; each shard is grouped, put in rank order and written by
one worker under a temporary name. The driver then renames the shards into place (an empty file for
a shard nothing went to) and writes ``stats.json`` last, as ``DecontaminatedCopy.write`` does: the
shard files are those of the single-process run. A worker holds one shard's records.

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
from absl import logging
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from medllama_jax.contamination.decontaminate import DecontaminatedCopy
from medllama_jax.contamination.eval_sets import EvalSetIndex
from medllama_jax.contamination.scan import (SourceTally, TopDocuments, check_settings,
                                              scan_documents)
from medllama_jax.contamination.sources import CorpusSource, SourceFile
from medllama_jax.data import beam_prepare, instruct

_INDEX, _SCAN_RESULT = "index.pickle", "scan.pickle"


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


def _kept_tag(copy_number: int) -> str:
  return f"kept{copy_number}"


def _shard_counts_file(copy_number: int) -> str:
  return f"shard_counts{copy_number}.pickle"


class _ScanFile(beam.DoFn):
  """Scans one file: yields its :class:`ScanPart` and, for a corpus being copied (``copied``: its
  name → its output's tag), every document that does not overlap as ``beam_prepare`` ranks them:
  ``((split, file), (file, record, id, text))``."""

  def __init__(self, index_path: str, top_documents: int, batch_words: int,
               copied: Mapping[str, str]):
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
    tally = SourceTally.empty(task.source.kind, index)
    top = TopDocuments(len(index.datasets), self._top_documents)
    rejections = instruct.Rejections()
    documents = task.source.file_documents(task.file, rejections)
    positioned = (((task.source_number, task.file_number, record), document)
                  for record, document in enumerate(documents))
    scanned = scan_documents(index, name, positioned, tally, top, self._batch_words)
    copied = name in self._copied
    for record, (document, overlaps) in enumerate(scanned):
      if copied and not overlaps:
        kept = (task.file_number, record, document.id, document.texts[0].encode("utf-8"))
        yield beam.pvalue.TaggedOutput(self._copied[name],
                                       ((document.split, task.file_number), kept))
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
  """The pipeline: files scanned in parallel, parts merged, each copy's kept documents written."""
  tasks = [_FileTask(source_number, file_number, source, file)
           for source_number, source in enumerate(sources)
           for file_number, file in enumerate(source.files())]
  tags = {name: _kept_tag(number) for number, name in enumerate(copies)}
  scanned = (pipeline
             | "Files" >> beam.Create(tasks)
             | "Spread" >> beam.Reshuffle()
             | "Scan" >> beam.ParDo(_ScanFile(FileSystems.join(work_dir, _INDEX), top_documents,
                                              batch_words, tags))
             .with_outputs(*tags.values(), main="parts"))
  _ = (scanned.parts
       | "Merge" >> beam.CombineGlobally(_MergeParts())
       | "SaveScan" >> beam.Map(_save, FileSystems.join(work_dir, _SCAN_RESULT)))
  for number, copied in enumerate(copies.values()):
    _write_copy(scanned[_kept_tag(number)], copied, number,
                FileSystems.join(work_dir, _shard_counts_file(number)))


def _write_copy(kept: beam.PCollection, copied: DecontaminatedCopy, number: int,
                shard_counts_path: str) -> None:
  """Ranks a copy's kept documents in their split and writes its shards (``beam_prepare``'s
  steps); saves ``[(split, shard, records, None)]``."""
  _ = (beam_prepare.write_shards(kept, copied.out_dir, copied.num_shards, None, stage=str(number))
       | f"ShardCounts{number}" >> beam.combiners.ToList()
       | f"SaveCounts{number}" >> beam.Map(_save, shard_counts_path))


def _empty(sources: Sequence[CorpusSource], index: EvalSetIndex, top_documents: int,
           copies: Mapping[str, DecontaminatedCopy]) -> ScanPart:
  """Zero counts for every source in the order given (the report's order), every copied split."""
  return ScanPart(
      {s.name: SourceTally.empty(s.kind, index) for s in sources},
      TopDocuments(len(index.datasets), top_documents),
      {s.name: collections.Counter() for s in sources},
      {name: collections.Counter({split: 0 for split in c.corpus.file_patterns})
       for name, c in copies.items()})


def _finish_copy(copied: DecontaminatedCopy,
                 shard_counts: Sequence[tuple[str, int, int, None]],
                 removed: Mapping[str, int], provenance: Mapping[str, Any]) -> dict[str, Any]:
  """Renames the copy's shards into place (empty files where nothing went) and writes its
  ``stats.json``; returns it."""
  splits = list(copied.corpus.file_patterns)
  beam_prepare.move_into_place(copied.out_dir, splits, copied.num_shards)
  counts = {split: [0] * copied.num_shards for split in splits}
  for split, shard, count, _ in shard_counts:
    counts[split][shard] = count
  return copied.finish(counts, dict(removed), provenance)


def run_scan(sources: Sequence[CorpusSource], index: EvalSetIndex, top_documents: int,
             batch_words: int, copies: Mapping[str, DecontaminatedCopy],
             provenance: Mapping[str, Any], options: PipelineOptions
             ) -> tuple[ScanPart, dict[str, dict[str, Any]]]:
  """Runs the scan on Beam; returns the merged scan and each copy's ``stats.json``."""
  check_settings(top_documents, batch_words)
  work_dir = _work_dir(options)
  paths = {name: FileSystems.join(work_dir, name)
           for name in (_INDEX, _SCAN_RESULT, *map(_shard_counts_file, range(len(copies))))}
  logging.info("Beam scan of %d sources; the index and results pass through %s", len(sources),
               work_dir)
  _save(index, paths[_INDEX])
  try:
    with beam.Pipeline(options=options) as pipeline:
      _build(pipeline, sources, top_documents, batch_words, copies, work_dir)
    scanned = _load(paths[_SCAN_RESULT])
    shard_counts = [_load(paths[_shard_counts_file(number)]) for number in range(len(copies))]
  except BaseException:
    for copied in copies.values():
      beam_prepare.discard(copied.out_dir, list(copied.corpus.file_patterns), copied.num_shards)
    raise
  finally:
    _remove(work_dir, paths.values())
  merged = _empty(sources, index, top_documents, copies)
  if scanned is not None:
    merged.merge(scanned)
  return merged, {name: _finish_copy(copied, counts, merged.removed[name], provenance)
                  for (name, copied), counts in zip(copies.items(), shard_counts)}
