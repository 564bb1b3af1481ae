"""The corpus preparer as an Apache Beam pipeline: :func:`records.prepare`'s output, at any scale.

One Beam job reads the inputs in parallel, one input file per work item, with the readers and the
cleaning of the single-process preparer (:func:`records.cleaned_documents`), and writes the same
folder: the same TFRecord shards, byte for byte, and the same ``stats.json``. What one process does in
passing, the pipeline does with keys:

* exact duplicates, across the whole corpus: documents are combined by content hash
  (:func:`records.content_key`), and each text keeps its first document in input order (input file,
  then place in it): the one the single process keeps;
* near duplicates, when asked for (:mod:`near_duplicates`): every document's MinHash signature goes to
  its LSH buckets, each bucket marks the documents near its first one, and the marked are dropped;
* the split, by id hash (:func:`records.split_of`), as before;
* the shards: the single process deals each split's documents round-robin in input order, so a
  document's shard is its rank in its split modulo ``num_shards``. The rank is the number of documents
  kept from earlier inputs (a small table of per-input counts, a side input) plus its rank inside its
  own input; each shard is then grouped, put in rank order and written by one worker.

A worker holds one input's document positions while ranking and one shard's records while writing it:
choose ``num_shards`` so that a shard is a few hundred MB (about 1,000 shards for Me-LLaMA's 129B
tokens).

Shards are written under the preparer's hidden ``.incomplete`` names. The counts (per input, the
duplicates, per shard, token lengths when a vocabulary is given) go to a summary file that the
launching process reads once the job is done; it then applies ``max_errors`` (when it is exceeded the
shards are deleted and nothing is kept), renames the shards into place, writes the shards no document
went to as empty files, and writes ``stats.json`` last, as the single process does.
"""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import apache_beam as beam
import tensorflow as tf
from absl import logging

from medllama_jax.data import corpora, records
from medllama_jax.data import near_duplicates as minhash
from medllama_jax.data.near_duplicates import NearDuplicateSettings

if TYPE_CHECKING:
  from apache_beam.options.pipeline_options import PipelineOptions

  from medllama_jax.data.vocab import TokenizerVocabulary

SUMMARY_FILE = "beam_summary.pickle"
_TALLY = "tally"

# A document on its way through the pipeline: (input index, place in the input, id, cleaned text).
Document = tuple[int, int, str, bytes]


def _read_input(indexed_path: tuple[int, str], format: str, min_chars: int, label: str,
                reader_options: Mapping[str, Any]) -> Iterator[Any]:
  """The input's documents keyed by content, then (tagged) its tally."""
  index, path = indexed_path
  logging.info("%s: reading %s", label, path)
  tally = records.Tally(label)
  documents = records.cleaned_documents(format, path, tally, min_chars, None, reader_options)
  for place, (record_id, data) in enumerate(documents):
    yield records.content_key(data), (index, place, record_id, data)
  yield beam.pvalue.TaggedOutput(_TALLY, (index, tally))


class FirstOccurrence(beam.CombineFn):
  """Of the documents that share one text: how many there are, and the first in input order."""

  def create_accumulator(self) -> tuple[int, Document | None]:
    return 0, None

  def add_input(self, accumulator: tuple[int, Document | None], document: Document
                ) -> tuple[int, Document | None]:
    count, first = accumulator
    return count + 1, document if first is None or document[:2] < first[:2] else first

  def merge_accumulators(self, accumulators: Iterable[tuple[int, Document | None]]
                         ) -> tuple[int, Document | None]:
    accumulators = list(accumulators)
    firsts = [first for _, first in accumulators if first is not None]
    return (sum(count for count, _ in accumulators),
            min(firsts, key=lambda document: document[:2]) if firsts else None)

  def extract_output(self, accumulator: tuple[int, Document | None]
                     ) -> tuple[int, Document | None]:
    return accumulator


def _signed(document: Document, settings: NearDuplicateSettings
            ) -> Iterator[tuple[bytes, tuple[tuple[int, int], Any]]]:
  """The document's place and MinHash signature, keyed by each of its LSH buckets."""
  signature = minhash.signature(document[3].decode("utf-8"), settings)
  for key in minhash.bucket_keys(signature, settings):
    yield key, (document[:2], signature)


def _near_first(bucket: tuple[bytes, Mapping[str, Iterable[tuple[tuple[int, int], Any]]]],
                threshold: float) -> Iterator[tuple[int, int]]:
  """The places of a bucket's documents that are near its first one (in input order).

  The members are streamed past the first, never held together: a bucket of boilerplate can hold
  millions of documents."""
  _, joined = bucket
  (first_place, first), = joined["first"]
  for place, signature in joined["members"]:
    if place != first_place and minhash.similar(signature, first, threshold):
      yield place


def _earliest(members: Iterable[tuple[tuple[int, int], Any]]) -> tuple[tuple[int, int], Any]:
  return min(members, key=lambda member: member[0])


def _drop_near_duplicates(documents: beam.PCollection, settings: NearDuplicateSettings
                          ) -> tuple[beam.PCollection, beam.PCollection]:
  """The documents that are no near duplicates, and how many were."""
  members = documents | "Sign" >> beam.FlatMap(_signed, settings)
  firsts = members | "FirstOfEachBucket" >> beam.CombinePerKey(_earliest)
  near = ({"members": members, "first": firsts}
          | "JoinFirsts" >> beam.CoGroupByKey()
          | "NearTheFirst" >> beam.FlatMap(_near_first, settings.threshold)
          | "OncePerDocument" >> beam.Distinct())
  count = near | "CountNear" >> beam.combiners.Count.Globally()
  kept = ({"document": documents | "ByPlace" >> beam.Map(lambda d: (d[:2], d)),
           "near": near | "Marked" >> beam.Map(lambda place: (place, True))}
          | "JoinMarks" >> beam.CoGroupByKey()
          | "Unmarked" >> beam.FlatMap(
              lambda joined: [] if joined[1]["near"] else joined[1]["document"]))
  return kept, count


def _input_offsets(counts: Iterable[tuple[tuple[str, int], int]]) -> dict[tuple[str, int], int]:
  """``{(split, input): documents of that split kept from earlier inputs}``."""
  offsets = {}
  running: collections.Counter[str] = collections.Counter()
  for (split, index), count in sorted(counts):
    offsets[split, index] = running[split]
    running[split] += count
  return offsets


def _ranked(group: tuple[tuple[str, int], Iterable[Document]],
            offsets: Mapping[tuple[str, int], int], num_shards: int) -> Iterator[Any]:
  """Each of one input's documents of one split, keyed by its shard, with its rank in the split."""
  (split, index), documents = group
  first = offsets[split, index]
  rank_of = {place: rank for rank, place in
             enumerate(sorted(document[1] for document in documents), start=first)}
  for _, place, record_id, data in documents:
    rank = rank_of[place]
    yield (split, rank % num_shards), (rank, record_id, data)


def _write_shard(group: tuple[tuple[str, int], Iterable[tuple[int, str, bytes]]], out_dir: str,
                 num_shards: int, vocabulary: TokenizerVocabulary | None
                 ) -> tuple[str, int, int, dict[int, int] | None]:
  """Writes one shard, in rank order, under its temporary name; returns its split, number, count
  and, with a vocabulary, its documents' token-length histogram."""
  (split, shard), documents = group
  documents = sorted(documents)
  path = records.temporary(os.path.join(out_dir, records.shard_name(split, shard, num_shards)))
  with tf.io.TFRecordWriter(path) as writer:
    for _, record_id, data in documents:
      writer.write(records.example(record_id, data))
  histogram = None
  if vocabulary is not None:
    from medllama_jax.data import token_stats

    histogram = token_stats.length_histogram(
        (data.decode("utf-8") for _, _, data in documents), vocabulary)
  return split, shard, len(documents), histogram


def _write_summary(_: Any, out_dir: str, tallies: list[tuple[int, records.Tally]],
                   shards: list[tuple[str, int, int, dict[int, int] | None]],
                   duplicates: int, near: int) -> None:
  summary = {"tallies": tallies, "shards": shards, "duplicates": duplicates, "near": near}
  with tf.io.gfile.GFile(records.temporary(os.path.join(out_dir, SUMMARY_FILE)), "wb") as f:
    pickle.dump(summary, f)


def build(pipeline: beam.Pipeline, format: str, paths: Sequence[str], out_dir: str, *,
          num_shards: int, validation_fraction: float, min_chars: int,
          vocabulary: TokenizerVocabulary | None,
          near_duplicate_settings: NearDuplicateSettings | None,
          reader_options: Mapping[str, Any]) -> None:
  """Adds the preparation of ``paths`` into ``out_dir`` (temporary shards and summary) to
  ``pipeline``."""
  parsed = (pipeline
            | "Inputs" >> beam.Create(list(enumerate(paths)))
            | "OneInputPerWorker" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(_read_input, format, min_chars, out_dir,
                                     dict(reader_options)).with_outputs(_TALLY, main="documents"))
  by_text = parsed.documents | "FirstOfEachText" >> beam.CombinePerKey(FirstOccurrence())
  duplicates = (by_text
                | "Duplicates" >> beam.Map(lambda keyed: keyed[1][0] - 1)
                | "CountDuplicates" >> beam.CombineGlobally(sum))
  kept = by_text | "Kept" >> beam.Map(lambda keyed: keyed[1][1])
  if near_duplicate_settings is None:
    near = pipeline | "NoNearDuplicates" >> beam.Create([0])
  else:
    kept, near = _drop_near_duplicates(kept, near_duplicate_settings)
  kept = (kept
          | "BySplitAndInput" >> beam.Map(
              lambda document: ((records.split_of(document[2], validation_fraction), document[0]),
                                document)))
  shards = write_shards(kept, out_dir, num_shards, vocabulary)
  _ = (pipeline
       | "Once" >> beam.Create([None])
       | "WriteSummary" >> beam.Map(_write_summary, out_dir,
                                    beam.pvalue.AsList(parsed[_TALLY]),
                                    beam.pvalue.AsList(shards),
                                    beam.pvalue.AsSingleton(duplicates),
                                    beam.pvalue.AsSingleton(near)))


def write_shards(documents: beam.PCollection, out_dir: str, num_shards: int,
                 vocabulary: TokenizerVocabulary | None, stage: str = "") -> beam.PCollection:
  """Writes ``documents``, keyed by ``(split, input index)``, into each split's ``num_shards``
  shards under their temporary names, dealt round-robin in input order as one process deals them.

  Returns each written shard's ``(split, number, records, token-length histogram or None)``.
  ``stage`` tells apart the steps of several calls in one pipeline.
  """
  offsets = (documents
             | f"One{stage}" >> beam.Map(lambda keyed: (keyed[0], 1))
             | f"PerInput{stage}" >> beam.CombinePerKey(sum)
             | f"AllInputs{stage}" >> beam.combiners.ToList()
             | f"Offsets{stage}" >> beam.Map(_input_offsets))
  return (documents
          | f"GroupInputs{stage}" >> beam.GroupByKey()
          | f"Rank{stage}" >> beam.FlatMap(_ranked, beam.pvalue.AsSingleton(offsets), num_shards)
          | f"GroupShards{stage}" >> beam.GroupByKey()
          | f"WriteShards{stage}" >> beam.Map(_write_shard, out_dir, num_shards, vocabulary))


def _take_summary(out_dir: str) -> dict[str, Any]:
  path = records.temporary(os.path.join(out_dir, SUMMARY_FILE))
  with tf.io.gfile.GFile(path, "rb") as f:
    summary = pickle.load(f)
  tf.io.gfile.remove(path)
  return summary


def _shard_names(out_dir: str, splits: Sequence[str], num_shards: int) -> list[str]:
  return [os.path.join(out_dir, records.shard_name(split, i, num_shards))
          for split in splits for i in range(num_shards)]


def discard(out_dir: str, splits: Sequence[str], num_shards: int) -> None:
  """Deletes what a failed or refused run wrote."""
  for path in [*_shard_names(out_dir, splits, num_shards), os.path.join(out_dir, SUMMARY_FILE)]:
    if tf.io.gfile.exists(records.temporary(path)):
      tf.io.gfile.remove(records.temporary(path))


def move_into_place(out_dir: str, splits: Sequence[str], num_shards: int) -> None:
  """Renames the written shards to their names; a shard no document went to becomes an empty file."""
  for path in _shard_names(out_dir, splits, num_shards):
    if tf.io.gfile.exists(records.temporary(path)):
      tf.io.gfile.rename(records.temporary(path), path, overwrite=True)
    else:
      tf.io.TFRecordWriter(path).close()


def prepare(format: str, inputs: Sequence[str], out_dir: str, *, pipeline_options: PipelineOptions,
            num_shards: int = 8, validation_fraction: float = 0.001, min_chars: int = 32,
            overwrite: bool = False, max_errors: float | None = None,
            vocabulary: TokenizerVocabulary | None = None,
            near_duplicates: NearDuplicateSettings | None = None, **reader_options: Any
            ) -> dict[str, Any]:
  """:func:`records.prepare` run as a Beam pipeline with ``pipeline_options`` (its runner and
  options); same arguments, checks, output and return value. ``max_errors`` is applied once the job
  is done, to the whole corpus."""
  records.check_settings(num_shards, validation_fraction, min_chars, max_errors)
  corpora.check_options(format, reader_options)
  paths = records.expand_inputs(inputs)
  records.claim_out_dir(out_dir, overwrite)
  splits = records.splits_of(validation_fraction)
  try:
    with beam.Pipeline(options=pipeline_options) as pipeline:
      build(pipeline, format, paths, out_dir, num_shards=num_shards,
            validation_fraction=validation_fraction, min_chars=min_chars, vocabulary=vocabulary,
            near_duplicate_settings=near_duplicates, reader_options=reader_options)
    summary = _take_summary(out_dir)
    tally = records.Tally(out_dir)
    for _, input_tally in sorted(summary["tallies"], key=lambda indexed: indexed[0]):
      tally.merge(input_tally)
    tally.duplicates = summary["duplicates"]
    tally.near_duplicates = summary["near"]
    tally.check_errors(max_errors, final=True)
  except BaseException:
    discard(out_dir, splits, num_shards)
    raise
  move_into_place(out_dir, splits, num_shards)
  counts = {split: [0] * num_shards for split in splits}
  histograms: dict[str, collections.Counter[int]] = {split: collections.Counter() for split in splits}
  for split, shard, count, histogram in summary["shards"]:
    counts[split][shard] = count
    histograms[split].update(histogram or {})
  stats = records.summary(format, paths, reader_options, num_shards, validation_fraction,
                          min_chars, max_errors, tally, counts, near_duplicates)
  return records.finish(out_dir, stats, vocabulary,
                        histograms if vocabulary is not None else None)
