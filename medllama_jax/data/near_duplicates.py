"""Near-duplicate documents, by MinHash LSH over word shingles: the corpus preparer's optional stage.

Web and biomedical dumps repeat documents with small edits (a reprinted abstract, a boilerplate note
with a different date). Two documents are near duplicates when the Jaccard similarity of their sets of
``shingle_words``-word shingles reaches ``threshold``. MinHash estimates it: each of ``permutations``
hash functions keeps the smallest hash over a document's shingles, and two signatures agree at a
position with probability equal to the Jaccard similarity. Locality-sensitive hashing finds the
candidate pairs without comparing all of them: the signature is cut into ``bands`` of ``rows`` values,
and documents that agree on a whole band land in one bucket; ``bands`` and ``rows`` are chosen for the
threshold (:func:`band_layout`).

The rule, the same for the single process and for Beam, so that both keep the same documents: in every
bucket the first document in input order is kept by that bucket, and every other document whose
estimated similarity to it reaches the threshold is a near duplicate and is removed. A document is only
ever removed because of an earlier one, so one pass in input order applies the rule
(:class:`NearDuplicateFilter`), and Beam applies it bucket by bucket. Like every bucket-based
deduplication it can remove a document whose nearest earlier neighbour was itself removed (chains of
small edits), and never compares documents that share no band.

Words are runs of letters and digits, casefolded; word and shingle hashes are fixed (BLAKE2b), so
signatures are the same in every process and run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Iterator

import numpy as np

_WORD = re.compile(r"\w+")
_SEED_KEY = b"medllama-jax minhash"


@dataclasses.dataclass(frozen=True)
class NearDuplicateSettings:
  """``threshold``: the Jaccard similarity from which a later document is removed."""
  threshold: float
  shingle_words: int = 5
  permutations: int = 128

  def __post_init__(self) -> None:
    if not 0 < self.threshold <= 1 or self.shingle_words < 1 or self.permutations < 2:
      raise ValueError(f"near duplicates need 0 < threshold <= 1, shingle_words >= 1 and "
                       f"permutations >= 2; got {self.threshold}, {self.shingle_words}, "
                       f"{self.permutations}")

  @property
  def layout(self) -> tuple[int, int]:
    return band_layout(self.threshold, self.permutations)

  def describe(self) -> dict[str, float | int]:
    """The settings as ``stats.json`` records them."""
    bands, rows = self.layout
    return {"threshold": self.threshold, "shingle_words": self.shingle_words,
            "permutations": self.permutations, "bands": bands, "rows": rows}


def band_layout(threshold: float, permutations: int) -> tuple[int, int]:
  """``(bands, rows)``, ``bands * rows <= permutations``, whose S-curve ``1 - (1 - s^rows)^bands`` (the
  chance that documents of similarity ``s`` share a bucket) best separates ``s < threshold`` from
  ``s >= threshold``: the least sum of the missed and the needless candidate probability, integrated
  over ``s``."""
  s = np.linspace(0.0, 1.0, 1001)
  below = s < threshold
  best = None
  for rows in range(1, permutations + 1):
    bands = permutations // rows
    candidate = 1.0 - (1.0 - s**rows)**bands
    error = np.trapezoid(np.where(below, candidate, 1.0 - candidate), s)
    if best is None or error < best[0]:
      best = (error, bands, rows)
  return best[1], best[2]


def _hash64(data: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@functools.cache
def _permutation_parameters(permutations: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed odd multipliers and offsets of the ``permutations`` multiply-shift hash functions."""
  values = np.array([_hash64(_SEED_KEY + i.to_bytes(4, "little")) for i in range(2 * permutations)],
                    dtype=np.uint64)
  return values[:permutations] | np.uint64(1), values[permutations:]


def shingle_hashes(text: str, shingle_words: int) -> np.ndarray:
  """32-bit hashes of the distinct ``shingle_words``-word shingles (one shingle for a shorter text)."""
  words = _WORD.findall(text.casefold())
  count = max(len(words) - shingle_words + 1, 1)
  shingles = {" ".join(words[i:i + shingle_words]) for i in range(count)}
  return np.array(sorted(_hash64(s.encode("utf-8")) & 0xFFFFFFFF for s in shingles),
                  dtype=np.uint64)


def signature(text: str, settings: NearDuplicateSettings) -> np.ndarray:
  """The document's MinHash signature: ``permutations`` uint32 values."""
  multipliers, offsets = _permutation_parameters(settings.permutations)
  shingles = shingle_hashes(text, settings.shingle_words)
  with np.errstate(over="ignore"):  # Multiply-shift hashing computes modulo 2^64 on purpose.
    hashed = (shingles[:, None] * multipliers[None, :] + offsets[None, :]) >> np.uint64(32)
  return hashed.min(axis=0).astype(np.uint32)


def bucket_keys(signature: np.ndarray, settings: NearDuplicateSettings) -> Iterator[bytes]:
  """The document's LSH buckets, one per band (the band's number, then its values)."""
  bands, rows = settings.layout
  for band in range(bands):
    yield band.to_bytes(2, "little") + signature[band * rows:(band + 1) * rows].tobytes()


def similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
  """Whether two signatures estimate a Jaccard similarity of at least ``threshold``."""
  return float(np.mean(a == b)) >= threshold


class NearDuplicateFilter:
  """The rule applied in one pass over documents in input order (the single-process preparer).

  Holds, per bucket, the signature of its first document: memory grows with the corpus (about
  ``bands`` entries and one signature per document), which suits one machine's corpora; Beam's
  version groups the buckets instead.
  """

  def __init__(self, settings: NearDuplicateSettings):
    self.settings = settings
    self._first: dict[bytes, np.ndarray] = {}

  def is_near_duplicate(self, text: str) -> bool:
    """Whether ``text`` nears the first document of one of its buckets; records it in the buckets
    it is the first of."""
    own = signature(text, self.settings)
    duplicate = False
    for key in bucket_keys(own, self.settings):
      first = self._first.setdefault(key, own)
      duplicate = duplicate or (first is not own and similar(own, first, self.settings.threshold))
    return duplicate
