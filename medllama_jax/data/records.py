"""One raw corpus in, the sharded TFRecords that the pre-training seqio Tasks read out.

:func:`prepare` streams the records of a :mod:`corpora` reader through cleaning (:func:`clean_text`), a
minimum length, exact-duplicate removal, optionally near-duplicate removal (:mod:`near_duplicates`),
and a deterministic train/validation split by record id (:func:`split_of`), and deals them round-robin
into ``num_shards`` TFRecord files per split. Output, in ``out_dir``:

* ``{split}.tfrecord-{i:05d}-of-{n:05d}``: ``tf.train.Example`` records with the bytes features ``text``
  (UTF-8) and ``id`` (:data:`FEATURE_DESCRIPTION`);
* ``stats.json``: the run's summary (what :func:`prepare` returns): records read and written, damaged
  records by reason (``errors``), records left out on purpose by reason (``skipped``), texts dropped
  for being shorter than ``min_chars`` (``too_short``), exact duplicates, per-shard record counts and
  each split's ``file_pattern`` relative to ``out_dir`` (:func:`split_file_patterns` makes them whole);
  with near-duplicate removal, its settings and count (``near_duplicates``); with a vocabulary, the
  tokens per split (``tokens``, and the histograms in ``token_stats.json``).

Shards are written under hidden ``.<name>.incomplete`` names and renamed once every record is in; on an
error they are deleted. ``stats.json`` is written last, so a folder holding it is complete, and an
interrupted run never leaves files that look finished.

Duplicate detection keeps a 16-byte hash of every distinct text in memory for the whole run (about
100 bytes per record with the set's overhead, so a few GB for tens of millions of abstracts): it finds
duplicates within one run, not across corpora prepared separately. The Beam preparer
(:mod:`beam_prepare`) writes the same output with no such bound.

Nothing here logs or stores record text; rejections are logged by file, location and reason (the first
:data:`LOGGED_PER_REASON` of each reason; all are counted in the summary).
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf
from absl import logging

from medllama_jax import storage
from medllama_jax.data import corpora
from medllama_jax.data import error_limit
from medllama_jax.data.near_duplicates import NearDuplicateFilter, NearDuplicateSettings

if TYPE_CHECKING:
  from medllama_jax.data.vocab import TokenizerVocabulary

TRAIN, VALIDATION = "train", "validation"
STATS_FILE = "stats.json"
FEATURE_DESCRIPTION = {
    "text": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
}
PROGRESS_EVERY = 10_000
LOGGED_PER_REASON = 100

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode Cc less \t and \n.
_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_OUTPUT_FILE = re.compile(
    r"\.?(\w+\.tfrecord-\d{5}-of-\d{5}|stats\.json|token_stats\.json|beam_summary\.pickle)"
    r"(\.incomplete)?")


def clean_text(text: str) -> str:
  """NFC; ``\\r\\n``/``\\r`` → ``\\n``; control characters other than ``\\n`` and ``\\t`` removed;
  runs of spaces and tabs → one space (none at line ends); 3+ newlines → 2; stripped.

  MIMIC's de-identification placeholders (``[**2101-1-1**]``) are text like any other and stay.
  """
  text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
  text = _SPACES.sub(" ", _CONTROL.sub("", text)).replace(" \n", "\n")
  return _BLANK_LINES.sub("\n\n", text).strip()


def split_of(record_id: str, validation_fraction: float) -> str:
  """``validation`` for a fixed ``validation_fraction`` of ids (by hash), else ``train``: reruns agree."""
  digest = hashlib.sha256(record_id.encode("utf-8")).digest()
  return VALIDATION if int.from_bytes(digest[:8], "big") < validation_fraction * 2**64 else TRAIN


def temporary(path: str) -> str:
  """Where ``path`` is written before it is complete: hidden, and matching no split's file pattern."""
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.incomplete")


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def example(record_id: str, text: bytes) -> bytes:
  def feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  features = {"text": feature(text), "id": feature(record_id.encode("utf-8"))}
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


class ShardWriters:
  """Round-robin TFRecord shards per split, under temporary names until the ``with`` block succeeds."""

  def __init__(self, out_dir: str, splits: Sequence[str], num_shards: int):
    self._out_dir = out_dir
    self.names = {s: [shard_name(s, i, num_shards) for i in range(num_shards)] for s in splits}
    self.counts = {s: [0] * num_shards for s in splits}
    self._writers: dict[str, list[tf.io.TFRecordWriter]] = {}

  def _path(self, name: str, final: bool) -> str:
    path = os.path.join(self._out_dir, name)
    return path if final else temporary(path)

  def __enter__(self) -> ShardWriters:
    try:
      for split, names in self.names.items():
        self._writers[split] = [tf.io.TFRecordWriter(self._path(n, final=False)) for n in names]
    except BaseException:
      self._finish(keep=False)
      raise
    return self

  def write(self, split: str, record_id: str, text: bytes) -> None:
    counts = self.counts[split]
    shard = sum(counts) % len(counts)
    self._writers[split][shard].write(example(record_id, text))
    counts[shard] += 1

  def __exit__(self, error_type, error, traceback) -> None:
    self._finish(keep=error_type is None)

  def _finish(self, keep: bool) -> None:
    """Closes every shard, then renames them into place (``keep``) or deletes them."""
    for writers in self._writers.values():
      for writer in writers:
        writer.close()
    for names in self.names.values():
      for name in names:
        temporary = self._path(name, final=False)
        if keep:
          tf.io.gfile.rename(temporary, self._path(name, final=True), overwrite=True)
        elif tf.io.gfile.exists(temporary):
          tf.io.gfile.remove(temporary)


class Tally:
  """The run's counts; logs rejections (never text) and progress as they come.

  Damaged records (``errors``), records left out on purpose (``skipped``, see
  :data:`corpora.SKIPPED_REASONS`) and texts under ``min_chars`` (``too_short``) are counted apart, so a
  summary shows how much was lost to damage and how much to the run's own settings.
  """

  def __init__(self, label: str):
    self.label = label
    self.read = 0
    self.errors: collections.Counter[str] = collections.Counter()
    self.skipped: collections.Counter[str] = collections.Counter()
    self.too_short = 0
    self.duplicates = 0
    self.near_duplicates = 0
    self.first_error: corpora.Rejected | None = None
    self._logged: collections.Counter[str] = collections.Counter()

  @property
  def seen(self) -> int:
    """Every record met so far: documents, damaged records and skipped ones."""
    return self.read + sum(self.errors.values()) + sum(self.skipped.values())

  def reject(self, record: corpora.Rejected) -> None:
    if record.reason in corpora.SKIPPED_REASONS:
      self.skipped[record.reason] += 1
    else:
      self.errors[record.reason] += 1
      self.first_error = self.first_error or record
    self._log(record)

  def merge(self, other: Tally) -> None:
    """Adds the counts of ``other``, a tally of inputs that come after this one's."""
    self.read += other.read
    self.errors.update(other.errors)
    self.skipped.update(other.skipped)
    self.too_short += other.too_short
    self.duplicates += other.duplicates
    self.near_duplicates += other.near_duplicates
    self.first_error = self.first_error or other.first_error

  def check_errors(self, max_errors: float | None, final: bool) -> None:
    """Raises CorpusError, with a one-line summary, once the errors pass ``max_errors``.

    A count is checked as errors come, to stop a hopeless run early; a fraction of the records seen
    only at the end, as the first records of a run say little about the rest.
    """
    if max_errors is None or not (error_limit.is_count(max_errors) or final):
      return
    errors = sum(self.errors.values())
    if error_limit.exceeded(errors, self.seen, max_errors):
      reasons = ", ".join(f"{reason} {n}" for reason, n in self.errors.most_common())
      first = self.first_error
      raise corpora.CorpusError(
          f"{self.label}: too many errors, nothing written: "
          f"{error_limit.describe(errors, self.seen, max_errors, 'records')} ({reasons}; "
          f"first: {first.source} at {first.location})")

  def drop_short(self, record: corpora.Rejected) -> None:
    self.too_short += 1
    self._log(record)

  def _log(self, record: corpora.Rejected) -> None:
    self._logged[record.reason] += 1
    seen = self._logged[record.reason]
    if seen <= LOGGED_PER_REASON:
      logging.warning("skipped %s at %s: %s", record.source, record.location, record.reason)
    if seen == LOGGED_PER_REASON:
      logging.warning("%d records skipped as %r; further ones are counted, not logged",
                      seen, record.reason)

  def progress(self, written: int) -> None:
    logging.info("%s: %d records read, %d written, %d errors, %d skipped, %d too short, "
                 "%d duplicates", self.label, self.read, written, sum(self.errors.values()),
                 sum(self.skipped.values()), self.too_short, self.duplicates)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
  """Glob patterns → matching paths (sorted per pattern); a pattern that matches nothing is an error."""
  if isinstance(inputs, str) or not inputs:
    raise ValueError(f"inputs must be a non-empty list of paths or glob patterns, got {inputs!r}")
  paths: list[str] = []
  for pattern in inputs:
    matches = sorted(tf.io.gfile.glob(pattern) if storage.is_remote(pattern) else glob.glob(pattern))
    if not matches:
      raise FileNotFoundError(f"no input matches {pattern!r}")
    paths += matches
  return list(dict.fromkeys(paths))


def content_key(data: bytes) -> bytes:
  """The 16-byte hash by which exact duplicates are found."""
  return hashlib.blake2b(data, digest_size=16).digest()


def _is_new(data: bytes, seen: set[bytes]) -> bool:
  """False for an exact duplicate of a text already in ``seen``, else records it."""
  digest = content_key(data)
  if digest in seen:
    return False
  seen.add(digest)
  return True


def claim_out_dir(out_dir: str, overwrite: bool) -> None:
  """Creates ``out_dir``, or clears what an earlier run wrote there when ``overwrite``."""
  if not tf.io.gfile.exists(out_dir):
    tf.io.gfile.makedirs(out_dir)
    return
  existing = tf.io.gfile.listdir(out_dir)
  if existing and not overwrite:
    raise FileExistsError(f"{out_dir}: not empty; choose another folder or pass --overwrite")
  # stats.json goes first: from here on the folder no longer claims to be complete.
  for name in sorted(existing, key=lambda n: n != STATS_FILE):
    if _OUTPUT_FILE.fullmatch(name):
      tf.io.gfile.remove(os.path.join(out_dir, name))


def write_json(path: str, value: Any) -> None:
  """``value`` as JSON at ``path``, written under a temporary name and renamed into place."""
  unfinished = temporary(path)
  with tf.io.gfile.GFile(unfinished, "w") as f:
    f.write(json.dumps(value, indent=2) + "\n")
  tf.io.gfile.rename(unfinished, path, overwrite=True)


def check_settings(num_shards: int, validation_fraction: float, min_chars: int,
                   max_errors: float | None) -> None:
  """Raises ValueError for settings no run can use."""
  if num_shards < 1 or not 0 <= validation_fraction < 1 or min_chars < 0:
    raise ValueError(f"need num_shards >= 1, 0 <= validation_fraction < 1, min_chars >= 0; got "
                     f"{num_shards}, {validation_fraction}, {min_chars}")
  error_limit.check(max_errors)


def splits_of(validation_fraction: float) -> list[str]:
  return [TRAIN, VALIDATION] if validation_fraction > 0 else [TRAIN]


def cleaned_documents(format: str, path: str, tally: Tally, min_chars: int,
                      max_errors: float | None, reader_options: Mapping[str, Any]
                      ) -> Iterator[tuple[str, bytes]]:
  """``(id, cleaned UTF-8 text)`` of the documents of one input that are long enough, in file order.

  Rejected records and short texts are counted in ``tally`` (and a count ``max_errors`` checked as
  errors come); duplicates are the caller's business, since they are found across inputs.
  """
  for record in corpora.read(format, path, **reader_options):
    if isinstance(record, corpora.Rejected):
      tally.reject(record)
      tally.check_errors(max_errors, final=False)
      continue
    tally.read += 1
    text = clean_text(record.text)
    if len(text) < min_chars:
      tally.drop_short(corpora.Rejected(path, record.id, "too_short"))
    else:
      yield record.id, text.encode("utf-8")


def summary(format: str, paths: Sequence[str], reader_options: Mapping[str, Any], num_shards: int,
            validation_fraction: float, min_chars: int, max_errors: float | None, tally: Tally,
            shard_counts: Mapping[str, Sequence[int]],
            near_duplicates: NearDuplicateSettings | None) -> dict[str, Any]:
  """What ``stats.json`` says of a run (whichever engine ran it)."""
  splits = list(shard_counts)
  stats = {
      "format": format,
      "inputs": list(paths),
      "options": dict(reader_options),
      "num_shards": num_shards,
      "validation_fraction": validation_fraction,
      "min_chars": min_chars,
      "max_errors": max_errors,
      "records_read": tally.read,
      "records_written": {split: sum(counts) for split, counts in shard_counts.items()},
      "errors": dict(sorted(tally.errors.items())),
      "skipped": dict(sorted(tally.skipped.items())),
      "too_short": tally.too_short,
      "duplicates": tally.duplicates,
      "shards": {split: {shard_name(split, i, num_shards): count
                         for i, count in enumerate(shard_counts[split])} for split in splits},
      "file_pattern": {split: f"{split}.tfrecord-?????-of-{num_shards:05d}" for split in splits},
  }
  if near_duplicates is not None:
    stats["near_duplicates"] = {**near_duplicates.describe(), "removed": tally.near_duplicates}
  return stats


def finish(out_dir: str, stats: dict[str, Any], vocabulary: TokenizerVocabulary | None,
           histograms: Mapping[str, Mapping[int, int]] | None = None) -> dict[str, Any]:
  """Writes the token statistics (with a ``vocabulary``: the engine's ``histograms``, or counted
  from the written shards) and then ``stats.json``, whose presence marks ``out_dir`` complete."""
  if vocabulary is not None:
    from medllama_jax.data import token_stats

    if histograms is None:
      histograms = {split: token_stats.length_histogram(
                        (r["text"] for r in read_records(os.path.join(out_dir, pattern))),
                        vocabulary)
                    for split, pattern in stats["file_pattern"].items()}
    counted = token_stats.write_histograms(out_dir, vocabulary, histograms)
    stats["tokens"] = {split: entry["tokens"] for split, entry in counted["splits"].items()}
  write_json(os.path.join(out_dir, STATS_FILE), stats)
  near = stats.get("near_duplicates")
  logging.info("%s: %d records read, written %s, errors %s, skipped %s, %d shorter than %d "
               "characters, %d exact duplicates%s", out_dir, stats["records_read"],
               stats["records_written"], stats["errors"], stats["skipped"], stats["too_short"],
               stats["min_chars"], stats["duplicates"],
               f", {near['removed']} near duplicates" if near else "")
  return stats


def prepare(format: str, inputs: Sequence[str], out_dir: str, *, num_shards: int = 8,
            validation_fraction: float = 0.001, min_chars: int = 32, overwrite: bool = False,
            max_errors: float | None = None, vocabulary: TokenizerVocabulary | None = None,
            near_duplicates: NearDuplicateSettings | None = None,
            **reader_options: Any) -> dict[str, Any]:
  """Reads ``inputs`` (paths or glob patterns) with the ``format`` reader and writes ``out_dir``.

  ``validation_fraction`` 0 writes no validation split. ``reader_options`` go to the reader (e.g.
  ``pile_set_name``, ``mimic_category``). Damaged records are counted and passed over; ``max_errors``
  (a count, or a fraction of the records seen; None: no limit) turns too many of them into a
  CorpusError, and then nothing is written. With a ``vocabulary`` the written documents' tokens are
  counted too (``token_stats.json``, and per split in the summary). With ``near_duplicates``
  settings, documents close to an earlier one are removed as well (:mod:`near_duplicates`). Returns
  the summary also written to ``stats.json``. Raises ValueError (bad settings or options),
  FileNotFoundError (an input pattern matches nothing), FileExistsError (``out_dir`` not empty and not
  ``overwrite``) before anything is written. :mod:`medllama_jax.data.beam_prepare` writes the same
  output with Apache Beam.
  """
  check_settings(num_shards, validation_fraction, min_chars, max_errors)
  corpora.check_options(format, reader_options)
  paths = expand_inputs(inputs)
  claim_out_dir(out_dir, overwrite)
  tally = Tally(out_dir)
  seen: set[bytes] = set()
  near = NearDuplicateFilter(near_duplicates) if near_duplicates is not None else None
  with ShardWriters(out_dir, splits_of(validation_fraction), num_shards) as shards:
    for path in paths:
      logging.info("%s: reading %s", out_dir, path)
      for record_id, data in cleaned_documents(format, path, tally, min_chars, max_errors,
                                               reader_options):
        if not _is_new(data, seen):
          tally.duplicates += 1
        elif near is not None and near.is_near_duplicate(data.decode("utf-8")):
          tally.near_duplicates += 1
        else:
          shards.write(split_of(record_id, validation_fraction), record_id, data)
        if tally.read % PROGRESS_EVERY == 0:
          tally.progress(sum(map(sum, shards.counts.values())))
    tally.check_errors(max_errors, final=True)
  stats = summary(format, paths, reader_options, num_shards, validation_fraction, min_chars,
                  max_errors, tally, shards.counts, near_duplicates)
  return finish(out_dir, stats, vocabulary)


def split_file_patterns(out_dir: str) -> dict[str, str]:
  """``{split: file pattern}`` of a prepared folder, for ``seqio.TFExampleDataSource``."""
  path = os.path.join(out_dir, STATS_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path}: missing; {out_dir} is not a finished prepare_corpus output")
  with tf.io.gfile.GFile(path) as f:
    patterns = json.load(f)["file_pattern"]
  return {split: os.path.join(out_dir, pattern) for split, pattern in patterns.items()}


def read_records(file_pattern: str) -> Iterator[dict[str, str]]:
  """``{"id", "text"}`` of every record in the files matching ``file_pattern``, in file-name order."""
  for path in sorted(tf.io.gfile.glob(file_pattern)):
    dataset = tf.data.TFRecordDataset(path).map(
        lambda serialized: tf.io.parse_single_example(serialized, FEATURE_DESCRIPTION))
    for example in dataset.as_numpy_iterator():
      yield {key: value.decode("utf-8") for key, value in example.items()}
