"""A prepared corpus copied without the documents that share an n-gram with a test example.

The copy is written with ``medllama_jax.data.records``' own shard writer, so it is a prepared corpus
like any other: the same splits, shard count and file names, the kept documents dealt round-robin
into the shards in the order they were read, and a ``stats.json`` whose counts are the copy's, with
a ``decontamination`` entry saying what was removed and against which test sets. The pre-training
Tasks read it unchanged; copies of several corpora, each in a folder named as its original, form a
``data_dir`` for ``register_pretrain_mixture``. Shards are written under temporary names and
``stats.json`` last (records.py's rule), so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging

from medllama_jax.contamination.sources import CorpusDocument, PreparedCorpus
from medllama_jax.data import records


class DecontaminatedCopy:
  """Claims ``out_dir`` when made (a folder that is not empty needs ``overwrite``), so a bad output
  folder stops the run before any corpus is read; :meth:`write` fills it."""

  def __init__(self, corpus: PreparedCorpus, out_dir: str, overwrite: bool = False):
    self.corpus = corpus
    self.out_dir = out_dir
    records.claim_out_dir(out_dir, overwrite)

  def write(self, scanned: Iterable[tuple[CorpusDocument, bool]],
            provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the documents of ``scanned`` that do not overlap; returns the copy's ``stats.json``.

    ``provenance`` (the n-gram length and the test sets) goes into its ``decontamination`` entry.
    """
    splits = list(self.corpus.file_patterns)
    removed = {split: 0 for split in splits}
    with records.ShardWriters(self.out_dir, splits, self.num_shards) as shards:
      for document, overlaps in scanned:
        if overlaps:
          removed[document.split] += 1
        else:
          shards.write(document.split, document.id, document.texts[0].encode("utf-8"))
    return self.finish(shards.counts, removed, provenance)

  @property
  def num_shards(self) -> int:
    return self.corpus.stats["num_shards"]

  def finish(self, counts: Mapping[str, Sequence[int]], removed: Mapping[str, int],
             provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Writes ``stats.json`` (last: the copy is complete) from the records per shard of each split
    and the documents ``removed`` per split; returns it."""
    splits = list(self.corpus.file_patterns)
    names = {split: [records.shard_name(split, i, self.num_shards) for i in range(self.num_shards)]
             for split in splits}
    stats = {
        **self.corpus.stats,
        "records_written": {split: sum(counts[split]) for split in splits},
        "shards": {split: dict(zip(names[split], counts[split])) for split in splits},
        "file_pattern": {split: f"{split}.tfrecord-?????-of-{self.num_shards:05d}"
                         for split in splits},
        "decontamination": {"source": self.corpus.path, "removed": dict(removed), **provenance},
    }
    records.write_json(os.path.join(self.out_dir, records.STATS_FILE), stats)
    logging.info("%s: decontaminated copy of %s, written %s, removed %s", self.out_dir,
                 self.corpus.path, stats["records_written"], stats["decontamination"]["removed"])
    return stats
