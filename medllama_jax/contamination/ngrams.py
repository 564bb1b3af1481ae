"""Words and n-gram hashes: the one normalisation both sides of the contamination check share.

Normalisation (GPT-3's and lm-evaluation-harness's decontamination, which lowercase and drop
punctuation, made Unicode-aware):

1. Unicode NFKC, so full-width letters, ligatures (``ﬁ``) and superscript digits become their plain
   forms;
2. case folding (``str.casefold``: lowercase, and ``ß`` → ``ss``);
3. words are maximal runs of letters and digits; everything else (spaces, punctuation, ``_``,
   symbols) only separates words.

"Patient's BP: 140/90" and "patient s bp 140 90" therefore have the same words, and a test text
copied into a corpus with other spacing, line breaks, case or punctuation is still found.

Hashes are 64-bit and fixed functions of the words, so every process, machine and Python version
computes the same ones (Python's ``hash`` is salted per process). A word's hash is the 8-byte
BLAKE2b digest (``digest_size=8``) of its UTF-8 bytes, read little-endian. An n-gram's hash sums,
modulo 2**64, the word hashes each passed through a mixer keyed by the word's position in the n-gram
(SplitMix64's finaliser of ``word + (position + 1) * golden``): the sum depends on word order, and
since a mixed word hash is as good as random, two different n-grams collide with probability about
2**-64. With ``U`` distinct test n-grams and ``C`` corpus n-grams, about ``U * C / 2**64`` false
matches are expected: 0.05 for 10**7 test n-grams against 10**11 corpus tokens. The mixing and
summing run in numpy over many texts at once; word hashes of recently seen words are cached (at most
:data:`WORD_CACHE_SIZE`), because BLAKE2b per word would dominate the scan.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

WORD_CACHE_SIZE = 1 << 20
_WORD = re.compile(r"[^\W_]+")
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_word_cache: dict[str, int] = {}


def words(text: str) -> list[str]:
  """The normalised words of ``text`` (module docstring)."""
  return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def word_hash(word: str) -> int:
  """The 8-byte BLAKE2b digest of the word's UTF-8 bytes, read little-endian."""
  return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def word_hashes(text_words: list[str]) -> np.ndarray:
  """:func:`word_hash` of each word, as uint64, through the bounded cache."""
  cache = _word_cache
  values = list(map(cache.get, text_words))
  if None in values:
    if len(cache) > WORD_CACHE_SIZE:
      cache.clear()
    for position, value in enumerate(values):
      if value is None:
        values[position] = cache[text_words[position]] = word_hash(text_words[position])
  return np.array(values, dtype=np.uint64)


def _mixed(hashes: np.ndarray, position: int) -> np.ndarray:
  """SplitMix64's finaliser of ``hashes + (position + 1) * golden`` (uint64 arithmetic wraps)."""
  z = hashes + np.uint64((position + 1) * _GOLDEN % 2**64)
  z = (z ^ (z >> np.uint64(30))) * _MIX_1
  z = (z ^ (z >> np.uint64(27))) * _MIX_2
  return z ^ (z >> np.uint64(31))


def ngram_counts(lengths: np.ndarray, n: int) -> np.ndarray:
  """How many n-grams texts of ``lengths`` words have (none below ``n`` words)."""
  return np.maximum(np.asarray(lengths, np.int64) - n + 1, 0)


def ngram_hashes(hashes: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
  """The hash of every run of ``n`` consecutive words of several texts, text by text, in order
  (repeats kept); no n-gram spans two texts.

  ``hashes``: the texts' :func:`word_hashes`, concatenated; ``lengths``: each text's word count.
  Many texts are hashed in one call, so numpy's per-call cost is paid per batch, not per text.
  """
  lengths = np.asarray(lengths, np.int64)
  count = len(hashes) - n + 1
  if count <= 0:
    return np.zeros(0, dtype=np.uint64)
  total = np.zeros(count, dtype=np.uint64)
  for position in range(n):
    total += _mixed(hashes[position:position + count], position)
  ends = np.cumsum(lengths)
  starts = np.arange(count)
  text_end = ends[np.searchsorted(ends, starts, side="right")]
  return total[starts + n <= text_end]


def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """The word hashes of ``texts``, concatenated, and each text's word count."""
  text_words = [words(text) for text in texts]
  return (word_hashes(list(itertools.chain.from_iterable(text_words))),
          np.array([len(w) for w in text_words], np.int64))


def texts_ngram_hashes(texts: Sequence[str], n: int) -> np.ndarray:
  """The n-gram hashes of ``texts`` (none spans two), text by text."""
  return ngram_hashes(*encode(texts), n)
