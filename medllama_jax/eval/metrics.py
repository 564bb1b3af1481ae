"""Plain metric functions of (targets, predictions) for the MIBE evaluation.

Each function computes what its reference library computes on the same inputs: accuracy and
macro/weighted F1 as scikit-learn's ``accuracy_score``/``f1_score``, entity precision/recall/F1 as
seqeval's default (conlleval-style) mode on BIO tags, ROUGE as rouge-score. The classification and
entity formulas are a few lines of numpy, so neither scikit-learn nor seqeval is needed at run time
(seqeval ships only as an sdist, whose build needs setuptools_scm workarounds);
tests/test_eval_metrics.py checks every function against its library. Turning a model's free text into labels, tags or answers
is scorers.py's job: everything here takes those already parsed.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import string
from collections.abc import Collection, Hashable, Sequence
from typing import Literal

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# rouge-score's BootstrapAggregator (used by HF evaluate's "rouge", hence by the Me-LLaMA release).
BOOTSTRAP_SAMPLES = 1000


def _check_lengths(targets: Sequence[object], predictions: Sequence[object]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not targets:
    raise ValueError("no examples to score")


def accuracy(targets: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
  """Fraction of exact matches (``sklearn.metrics.accuracy_score``)."""
  _check_lengths(targets, predictions)
  return float(np.mean([t == p for t, p in zip(targets, predictions)]))


def _indicators(rows: Sequence[Collection[Hashable]], labels: Sequence[Hashable]) -> np.ndarray:
  """Boolean (examples × labels) matrix; members of a row that are not in ``labels`` are dropped."""
  index = {label: i for i, label in enumerate(labels)}
  matrix = np.zeros((len(rows), len(labels)), dtype=bool)
  for r, row in enumerate(rows):
    matrix[r, [index[x] for x in row if x in index]] = True
  return matrix


def _f1_per_label(gold: np.ndarray, predicted: np.ndarray,
                  zero_division: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-column F1 = 2·tp / (2·tp + fp + fn) and the gold support, as scikit-learn computes them:
  a label with no gold and no predicted positive (0/0) scores ``zero_division``."""
  tp = np.sum(gold & predicted, axis=0)
  support = np.sum(gold, axis=0)
  denominator = (support + np.sum(predicted, axis=0)).astype(np.float64)
  f1 = np.full(denominator.shape, float(zero_division))
  np.divide(2.0 * tp, denominator, out=f1, where=denominator > 0)
  return f1, support


def f1(targets: Sequence[Hashable], predictions: Sequence[Hashable], *,
       average: Literal["macro", "weighted"] = "macro", labels: Sequence[Hashable] | None = None,
       zero_division: float = 0.0) -> float:
  """Single-label F1 averaged over ``labels`` (``sklearn.metrics.f1_score``).

  ``labels`` defaults to the sorted union of targets and predictions, as in scikit-learn. A
  prediction outside ``labels`` (e.g. an unparseable "missing") is a false negative for its gold
  label and a false positive for nothing. ``weighted`` weighs each label by its gold support.
  """
  _check_lengths(targets, predictions)
  if labels is None:
    labels = sorted(set(targets) | set(predictions))
  scores, support = _f1_per_label(_indicators([[t] for t in targets], labels),
                                  _indicators([[p] for p in predictions], labels), zero_division)
  if average == "macro":
    return float(np.mean(scores))
  if average == "weighted":
    # scikit-learn falls back to the plain mean when no label has gold support.
    return float(np.average(scores, weights=support) if support.sum() else np.mean(scores))
  raise ValueError(f"average must be 'macro' or 'weighted', not {average!r}")


def multilabel_macro_f1(targets: Sequence[Collection[Hashable]],
                        predictions: Sequence[Collection[Hashable]], labels: Sequence[Hashable], *,
                        zero_division: float = 0.0) -> float:
  """Macro F1 over the (examples × labels) indicator matrices of label sets
  (``sklearn.metrics.f1_score(..., average="macro")`` on ``MultiLabelBinarizer`` output)."""
  _check_lengths(targets, predictions)
  scores, _ = _f1_per_label(_indicators(targets, labels), _indicators(predictions, labels),
                            zero_division)
  return float(np.mean(scores))


def _split_tag(tag: str) -> tuple[str, str]:
  if tag == "O":
    return "O", ""
  if tag[:2] in ("B-", "I-"):
    return tag[0], tag[2:]
  raise ValueError(f"{tag!r} is not a BIO tag (O, B-type or I-type)")


def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """``(type, first, last)`` token spans of a BIO sequence, read as seqeval's default mode reads
  them: an ``I-`` tag that does not continue an entity of its type starts a new one."""
  entities: list[tuple[str, int, int]] = []
  current, start = None, 0
  for i, tag in enumerate([*tags, "O"]):
    prefix, kind = _split_tag(tag)
    if current is not None and (prefix != "I" or kind != current):
      entities.append((current, start, i - 1))
      current = None
    if prefix == "B" or (prefix == "I" and current is None):
      current, start = kind, i
  return entities


def entity_scores(targets: Sequence[Sequence[str]],
                  predictions: Sequence[Sequence[str]]) -> dict[str, float]:
  """Micro precision, recall and F1 over exact entity matches (seqeval's ``precision_score``,
  ``recall_score``, ``f1_score``), for documents of BIO tags; 0/0 counts as 0."""
  _check_lengths(targets, predictions)
  for i, (gold, predicted) in enumerate(zip(targets, predictions)):
    if len(gold) != len(predicted):
      raise ValueError(f"document {i}: {len(gold)} gold tags but {len(predicted)} predicted")

  def spans(documents: Sequence[Sequence[str]]) -> set[tuple[int, str, int, int]]:
    return {(d, *entity) for d, tags in enumerate(documents) for entity in bio_entities(tags)}

  gold, predicted = spans(targets), spans(predictions)
  correct = len(gold & predicted)
  precision = correct / len(predicted) if predicted else 0.0
  recall = correct / len(gold) if gold else 0.0
  f1_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1_score}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
  """SQuAD's answer normalisation: lower-case, drop punctuation and articles, squeeze whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(targets: Sequence[str], predictions: Sequence[str]) -> float:
  """Mean exact match of SQuAD-normalised answers."""
  _check_lengths(targets, predictions)
  return float(np.mean([squad_normalize(t) == squad_normalize(p)
                        for t, p in zip(targets, predictions)]))


def _squad_token_f1(target: str, prediction: str) -> float:
  gold, predicted = squad_normalize(target).split(), squad_normalize(prediction).split()
  if not gold or not predicted:  # SQuAD 2.0: an empty answer scores 1 only against an empty one.
    return float(gold == predicted)
  common = sum((collections.Counter(gold) & collections.Counter(predicted)).values())
  if not common:
    return 0.0
  precision, recall = common / len(predicted), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad_f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
  """Mean SQuAD token F1 (bag-of-tokens overlap of the normalised answers)."""
  _check_lengths(targets, predictions)
  return float(np.mean([_squad_token_f1(t, p) for t, p in zip(targets, predictions)]))


def rouge(targets: Sequence[str], predictions: Sequence[str], *,
          aggregate: Literal["mean", "bootstrap"] = "mean", seed: int = 0,
          n_samples: int = BOOTSTRAP_SAMPLES) -> dict[str, float]:
  """ROUGE-1/2/L F-measures of rouge-score's defaults (its tokenizer, no stemming).

  ``mean`` is the plain mean over examples. ``bootstrap`` is the median of ``n_samples`` resampled
  means, drawn as rouge-score's ``BootstrapAggregator`` draws them (one legacy numpy stream,
  consumed rouge1, rouge2, rougeL in turn) but from ``RandomState(seed)`` instead of the unseeded
  global generator, so a run can be repeated.
  """
  # rouge-score imports nltk (seconds): loaded when ROUGE is computed, not with every metric.
  from rouge_score import rouge_scorer

  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
  per_example = [scorer.score(t, p) for t, p in zip(targets, predictions)]
  fmeasures = np.array([[scores[name].fmeasure for name in ROUGE_TYPES] for scores in per_example])
  if aggregate == "mean":
    return dict(zip(ROUGE_TYPES, map(float, fmeasures.mean(axis=0))))
  if aggregate != "bootstrap":
    raise ValueError(f"aggregate must be 'mean' or 'bootstrap', not {aggregate!r}")
  rng = np.random.RandomState(seed)
  n = len(targets)
  return {name: float(np.percentile(column[rng.choice(n, size=(n_samples, n))].mean(axis=1), 50))
          for name, column in zip(ROUGE_TYPES, fmeasures.T)}


# Longer than any encoder's context: what transformers puts when a tokenizer folder sets no limit.
_UNBOUNDED_LENGTH = 10**9


def check_bertscore_encoder(model_dir: str) -> None:
  """Raises, naming the file or field, unless ``model_dir`` is an encoder folder BERTScore can use.

  ``bert_score`` takes a model name or a folder; a name that is not a folder would be fetched from
  the Hugging Face Hub, so only existing folders are accepted. It also cuts inputs to the
  tokenizer's ``model_max_length``, which must therefore be set (transformers leaves it unbounded
  otherwise, and the fast tokenizer then overflows); and it picks the model class from the name
  (T5 when it contains "t5", SciBERT when it starts with "scibert").
  """
  if importlib.util.find_spec("bert_score") is None:
    raise ImportError("BERTScore needs the bert-score package: pip install "
                      "'medllama-jax[bertscore]' (or leave the encoder folder unset)")
  config = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"BERTScore encoder {model_dir}: no {config}; give a local folder "
                            "(save_pretrained of a BERT-like model and its tokenizer)")
  if "t5" in model_dir or os.path.basename(model_dir).startswith("scibert"):
    raise ValueError(f"BERTScore encoder {model_dir}: bert_score would load a folder whose path "
                     "contains 't5' (or starts with 'scibert') as T5/SciBERT; move or link it")
  tokenizer_config = os.path.join(model_dir, "tokenizer_config.json")
  limit = None
  if os.path.isfile(tokenizer_config):
    with open(tokenizer_config, encoding="utf-8") as f:
      limit = json.load(f).get("model_max_length")
  if not isinstance(limit, int) or not 0 < limit < _UNBOUNDED_LENGTH:
    raise ValueError(f"{tokenizer_config}: model_max_length is {limit!r}; set it to the encoder's "
                     "context (512 for BERT) so bert_score can cut long texts")


def bertscore_f1(targets: Sequence[str], predictions: Sequence[str], *, model_dir: str,
                 num_layers: int) -> float:
  """Mean BERTScore F1 with the encoder in the local folder ``model_dir`` (nothing is downloaded):
  ``bert_score.score`` with the embeddings of layer ``num_layers``, no idf weighting, no baseline
  rescaling.

  Needs the optional ``bert_score`` package. The release used ``bert-base-multilingual-cased``,
  whose default layer in bert_score is 9.
  """
  _check_lengths(targets, predictions)
  check_bertscore_encoder(model_dir)
  import bert_score

  _, _, f1_scores = bert_score.score(list(predictions), list(targets), model_type=model_dir,
                                     num_layers=num_layers)
  return float(f1_scores.mean())


def loglikelihood_choice(scores: Sequence[Sequence[float]],
                         gold: Sequence[int]) -> dict[str, float]:
  """Multiple choice by log-likelihood: the option with the highest score (first on ties) is the
  prediction; accuracy and macro F1 over the gold option indices."""
  _check_lengths(gold, scores)
  predictions = [int(np.argmax(row)) for row in scores]
  return {"acc": accuracy(gold, predictions),
          "macro_f1": f1(gold, predictions, average="macro", labels=sorted(set(gold)))}
