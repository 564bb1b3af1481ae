"""MinHash LSH near-duplicate removal: estimates against exact Jaccard similarities, the band layout,
and the removal rule in one pass (the Beam preparer's equality with it: tests/test_beam_prepare.py)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from medllama_jax.data import near_duplicates as minhash

WORDS = [f"w{i}" for i in range(5000)]


def document(rng: random.Random, words: int = 400) -> list[str]:
  return [rng.choice(WORDS) for _ in range(words)]


def edited(words: list[str], rng: random.Random, fraction: float) -> list[str]:
  """A copy with ``fraction`` of its words replaced by words of no other document."""
  copy = list(words)
  for i in rng.sample(range(len(copy)), int(fraction * len(copy))):
    copy[i] = f"edit{rng.randrange(10**9)}"
  return copy


def exact_jaccard(a: str, b: str, shingle_words: int) -> float:
  """The reference: Jaccard similarity of the two word-shingle sets, computed directly."""
  def shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i:i + shingle_words]) for i in range(len(words) - shingle_words + 1)}
  x, y = shingles(a), shingles(b)
  return len(x & y) / len(x | y)


def test_signature_agreement_estimates_the_exact_jaccard_similarity():
  """256 permutations: an estimate's standard deviation is at most 0.031; tolerance 0.1 (3.2 sigma)."""
  settings = minhash.NearDuplicateSettings(threshold=0.5, permutations=256)
  rng = random.Random(0)
  pairs = []
  for fraction in (0.0, 0.01, 0.03, 0.05, 0.1, 0.2, 0.4, 1.0):
    for _ in range(3):
      words = document(rng)
      pairs.append((" ".join(words), " ".join(edited(words, rng, fraction))))
  similarities = []
  for a, b in pairs:
    exact = exact_jaccard(a, b, settings.shingle_words)
    estimate = float(np.mean(minhash.signature(a, settings) == minhash.signature(b, settings)))
    assert abs(estimate - exact) <= 0.1, (exact, estimate)
    similarities.append(exact)
  assert min(similarities) < 0.05 and max(similarities) == 1.0  # the whole range was probed


def test_signatures_ignore_case_punctuation_and_spacing_and_are_fixed():
  settings = minhash.NearDuplicateSettings(threshold=0.8)
  a = minhash.signature("Chest pain, shortness of breath; admitted overnight.", settings)
  b = minhash.signature("chest PAIN shortness of\nbreath  admitted overnight", settings)
  assert a.dtype == np.uint32 and a.shape == (128,)
  assert np.array_equal(a, b)
  # Fixed hashes, not Python's salted hash(): these values are the same in every process.
  assert minhash.signature("one two three four five", settings)[:3].tolist() == [
      1320449824, 2499648279, 2011291415]
  assert minhash.shingle_hashes("a b", 5).shape == (1,)  # a text shorter than a shingle is one


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_band_layout_separates_the_threshold(threshold):
  bands, rows = minhash.band_layout(threshold, 128)
  assert bands * rows <= 128

  def candidate(s: float) -> float:
    return 1 - (1 - s**rows)**bands

  # The S-curve climbs at the threshold: most pairs 0.15 above it share a bucket, few 0.2 below.
  assert 0.3 < candidate(threshold) < 0.6
  assert candidate(min(threshold + 0.15, 1.0)) > 0.95
  assert candidate(threshold - 0.2) < 0.1


def test_one_pass_removes_documents_near_an_earlier_one_only():
  settings = minhash.NearDuplicateSettings(threshold=0.7)
  rng = random.Random(1)
  first, other = document(rng), document(rng)
  near = edited(first, rng, 0.02)  # Jaccard about 0.9
  far = edited(first, rng, 0.3)  # Jaccard about 0.2
  texts = [" ".join(words) for words in (first, other, near, far, near)]
  assert exact_jaccard(texts[0], texts[2], 5) > 0.8 and exact_jaccard(texts[0], texts[3], 5) < 0.3
  removal = minhash.NearDuplicateFilter(settings)
  assert [removal.is_near_duplicate(text) for text in texts] == [False, False, True, False, True]


def test_bad_settings_are_refused():
  for bad in [dict(threshold=0), dict(threshold=1.5), dict(threshold=0.8, shingle_words=0),
              dict(threshold=0.8, permutations=1)]:
    with pytest.raises(ValueError, match="near duplicates need"):
      minhash.NearDuplicateSettings(**bad)
