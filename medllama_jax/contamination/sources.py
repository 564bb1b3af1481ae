"""The corpus side: training data as a stream of documents, one at a time, whatever its size.

Three kinds of source, each read by the module that reads it for training:

* :class:`PreparedCorpus`: a ``scripts/prepare_corpus.py`` output folder (TFRecord shards and
  ``stats.json``), found as the pre-training Tasks find it (``seqio_tasks.pretrain``); every split
  is read, since the validation split is trained on for evaluation losses too. A document is one
  record, its id the record's ``id``.
* :class:`InstructionFile`: one instruction source (``.jsonl``, ``.json``, ``.parquet``) read by
  ``medllama_jax.data.instruct``; a document is one conversation, its texts the system turn, the
  context and every turn (each on its own), its id the record's ``id`` or, as in the instruction
  Tasks, ``{file name}:{line/index/row}``.
* :class:`RawCorpus`: raw files in a ``medllama_jax.data.corpora`` format (``jsonl`` for plain
  Pile/RedPajama JSON lines, ``pmc_txt`` for plain text files, the MIMIC and PubMed formats), to
  check data before it is prepared.

Every source is a list of :class:`SourceFile` (a shard, an instruction file, a raw input file), read
one after another by :meth:`documents`; the Beam scan reads each on a worker of its own with
:meth:`file_documents`, the same reader. Malformed records are skipped, counted by reason in the
source's ``rejections`` (or the one given to :meth:`file_documents`) and logged by file and place,
never by text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from medllama_jax.data import corpora, instruct, records
from seqio_tasks import pretrain

PREPARED, INSTRUCTION, RAW = "prepared", "instruction", "raw"


@dataclasses.dataclass(frozen=True)
class CorpusDocument:
  """One training document: its id, its texts (n-grams never span two), and for a prepared corpus
  the split it is stored in (its one text is then the record's text, byte for byte)."""
  id: str
  texts: tuple[str, ...]
  split: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One file of a source, read on its own: the unit of parallel work of the Beam scan."""
  path: str
  split: str | None = None


class _FileSource:
  """A source read file by file: :meth:`documents` chains :meth:`file_documents` over
  :meth:`files`, the reader the Beam scan calls per file."""
  rejections: instruct.Rejections

  def files(self) -> Sequence[SourceFile]:
    raise NotImplementedError

  def file_documents(self, file: SourceFile, rejections: instruct.Rejections
                     ) -> Iterator[CorpusDocument]:
    raise NotImplementedError

  def documents(self) -> Iterator[CorpusDocument]:
    for file in self.files():
      yield from self.file_documents(file, self.rejections)


class PreparedCorpus(_FileSource):
  """A prepared pre-training corpus folder; :attr:`stats` is its ``stats.json``."""
  kind = PREPARED

  def __init__(self, path: str):
    self.name = path
    self.path = path
    self.rejections = instruct.Rejections()
    self.file_patterns = pretrain.corpus_file_patterns(path)
    with tf.io.gfile.GFile(os.path.join(path, records.STATS_FILE)) as f:
      self.stats: dict[str, Any] = json.load(f)
    missing = [key for key in ("num_shards", "shards") if key not in self.stats]
    if missing:
      raise ValueError(f"{os.path.join(path, records.STATS_FILE)}: no {', '.join(missing)}; not "
                       "the output of scripts/prepare_corpus.py")
    for split, shards in self.stats["shards"].items():
      for shard in shards:
        if not tf.io.gfile.exists(os.path.join(path, shard)):
          raise FileNotFoundError(f"{os.path.join(path, shard)}: a shard of split {split!r} listed "
                                  f"in {records.STATS_FILE} is missing")

  def files(self) -> list[SourceFile]:
    """Every shard, split by split, in file-name order (``records.read_records``' order)."""
    return [SourceFile(path, split) for split, pattern in self.file_patterns.items()
            for path in sorted(tf.io.gfile.glob(pattern))]

  def file_documents(self, file: SourceFile, rejections: instruct.Rejections
                     ) -> Iterator[CorpusDocument]:
    for record in records.read_records(file.path):
      yield CorpusDocument(record["id"], (record["text"],), file.split)


class InstructionFile(_FileSource):
  """One file of instruction records."""
  kind = INSTRUCTION

  def __init__(self, path: str):
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"no instruction data file {path}")
    self.name = path
    self.path = path
    self.rejections = instruct.Rejections()

  def files(self) -> list[SourceFile]:
    return [SourceFile(self.path)]

  def file_documents(self, file: SourceFile, rejections: instruct.Rejections
                     ) -> Iterator[CorpusDocument]:
    base = os.path.basename(file.path)
    for location, conversation in instruct.read_conversations(file.path, rejections):
      texts = [conversation.context] if conversation.context else []
      texts += [turn.text for turn in conversation.turns]
      yield CorpusDocument(conversation.id or f"{base}:{location}", tuple(texts))


def instruction_files(path: str) -> list[InstructionFile]:
  """A file, or every instruction file in a folder (the instruction mixture's ``data_dir``)."""
  if not tf.io.gfile.isdir(path):
    return [InstructionFile(path)]
  names = sorted(name for name in tf.io.gfile.listdir(path)
                 if name.lower().endswith(instruct.FILE_SUFFIXES))
  if not names:
    raise FileNotFoundError(f"instruction data folder {path} holds no "
                            f"{'/'.join(instruct.FILE_SUFFIXES)} file")
  return [InstructionFile(os.path.join(path, name)) for name in names]


class RawCorpus(_FileSource):
  """Raw corpus files, ``FORMAT:PATH`` (a path or a glob pattern)."""
  kind = RAW

  def __init__(self, spec: str):
    format, _, pattern = spec.partition(":")
    if format not in corpora.READERS or not pattern:
      raise ValueError(f"raw corpus {spec!r}: give FORMAT:PATH, FORMAT one of "
                       f"{', '.join(corpora.READERS)}")
    self.name = spec
    self.format = format
    self.paths = records.expand_inputs([pattern])
    self.rejections = instruct.Rejections()

  def files(self) -> list[SourceFile]:
    return [SourceFile(path) for path in self.paths]

  def file_documents(self, file: SourceFile, rejections: instruct.Rejections
                     ) -> Iterator[CorpusDocument]:
    for record in corpora.read(self.format, file.path):
      if isinstance(record, corpora.Rejected):
        rejections.add(record.source, record.location, record.reason)
      else:
        yield CorpusDocument(record.id, (record.text,))


CorpusSource = PreparedCorpus | InstructionFile | RawCorpus
