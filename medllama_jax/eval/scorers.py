"""Reads MIBE model outputs as predictions and scores them, the release's way and a fixed way.

``variant="release"`` reproduces the evaluation code released with Me-LLaMA (``src/tasks/
vital_measure.py`` of BIDS-Xu-Lab/Me-LLaMA, an lm-evaluation-harness fork) flaws included, so that
our numbers can be set beside the paper's: first-substring choice matching ("no" inside "not", any
capital "A" for option A), case-sensitive DDI/HoC matching, emrQA's character-level "F1", lock-step
NER alignment that silently drops misaligned documents, and bootstrap-median ROUGE. ``variant=
"fixed"`` reads the same outputs as the tasks mean them: option letters and whole-word labels,
SQuAD EM/F1, NER aligned by characters. Both report the same keys, so the two can be tabulated side
by side. Every scorer is a pure function of (targets, predictions); the metrics live in metrics.py.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import html
import html.parser
import re
import string
from collections.abc import Callable, Collection, Sequence
from typing import Literal

import numpy as np

from medllama_jax.eval import metrics

Variant = Literal["release", "fixed"]
VARIANTS: tuple[str, ...] = ("release", "fixed")

# What an output that names no choice is read as; it is wrong against every gold label.
MISSING = "missing"

PUBMEDQA_LABELS = ("yes", "no", "maybe")
MEDQA_OPTIONS = ("A", "B", "C", "D", "E")
MEDMCQA_OPTIONS = MEDQA_OPTIONS[:4]
NLI_LABELS = ("entailment", "contradiction", "neutral")
# DDI and HoC labels in the release's ``choices`` order (src/preprocess_instruct.py).
DDI_LABELS = ("DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-false", "DDI-int")
HOC_LABELS = (
    "sustaining proliferative signaling",
    "evading growth suppressors",
    "resisting cell death",
    "enabling replicative immortality",
    "inducing angiogenesis",
    "activating invasion and metastasis",
    "genomic instability and mutation",
    "tumor promoting inflammation",
    "cellular energetics",
    "avoiding immune destruction",
)
# The 40 specialties of MTSamples (Kaggle's "medical_specialty", stripped) in the release's order:
# the ``choices`` of its MTSample task (``MTSample.choices`` in src/preprocess_instruct.py of
# BIDS-Xu-Lab/Me-LLaMA, which built the evaluation set), also the order its prompt lists them in.
# The release parser takes the first choice that is a substring of the output, so this order
# decides release scores: "Surgery" comes first, so an exact "Neurosurgery" or "Cosmetic / Plastic
# Surgery" is read as "Surgery".
MTSAMPLE_SPECIALTIES = (
    "Surgery", "Allergy / Immunology", "Sleep Medicine", "Pediatrics - Neonatal",
    "SOAP / Chart / Progress Notes", "Bariatrics", "Pain Management", "Lab Medicine - Pathology",
    "Dermatology", "Orthopedic", "Dentistry", "Psychiatry / Psychology", "General Medicine",
    "Office Notes", "Letters", "Neurosurgery", "Radiology", "Cosmetic / Plastic Surgery",
    "Nephrology", "Diets and Nutritions", "Chiropractic", "Gastroenterology",
    "Cardiovascular / Pulmonary", "Speech - Language", "Hospice - Palliative Care", "Autopsy",
    "Endocrinology", "Emergency Room Reports", "Discharge Summary", "ENT - Otolaryngology",
    "Urology", "Physical Medicine - Rehab", "Neurology", "Podiatry", "Ophthalmology",
    "Rheumatology", "IME-QME-Work Comp etc.", "Hematology - Oncology", "Consult - History and Phy.",
    "Obstetrics / Gynecology",
)
NER_CLASSES = ("problem", "treatment", "test")
# The release also accepts a "drug" class; i2b2 2010 gold has none, so it is a false positive.
RELEASE_NER_CLASSES = (*NER_CLASSES, "drug")

# rouge-score's BootstrapAggregator as HF evaluate (hence the release) calls it, but seeded.
DEFAULT_BOOTSTRAP_SEED = 0
# BERTScore layer for the release's encoder, bert-base-multilingual-cased (bert_score's table).
BERTSCORE_NUM_LAYERS = 9

NerGold = tuple[Sequence[str], Sequence[str]]  # (tokens, BIO tags), one pair per document


def _validated(targets: Sequence[object], predictions: Sequence[str], variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def _check_labels(labels: Collection[str], allowed: Sequence[str]) -> None:
  unknown = set(labels) - set(allowed)
  if unknown:
    raise ValueError(f"gold labels {sorted(unknown)} are not among {allowed}")


# --------------------------------------------------------------------------------------------------
# Parsers.


def parse_release_choice(output: str, choices: Sequence[str], lower_case: bool) -> str:
  """The release's reading: the first choice, in list order, that is a substring of the stripped
  (and, with ``lower_case``, lower-cased) output; ``MISSING`` if none is."""
  fold = str.lower if lower_case else str
  text = fold(output.strip())
  return next((choice for choice in choices if fold(choice) in text), MISSING)


def parse_release_ddi(output: str) -> str:
  """The release's DDI reading: exactly one distinct label string, case-sensitive, must occur."""
  found = [label for label in DDI_LABELS if label in output.strip()]
  return found[0] if len(found) == 1 else MISSING


def parse_release_hoc(output: str) -> frozenset[str]:
  """The release's HoC reading: every hallmark whose (lower-case) name occurs, case-sensitive."""
  return frozenset(label for label in HOC_LABELS if label in output.strip())


def find_label_mentions(output: str, labels: Sequence[str]) -> list[str]:
  """Labels named in the output as whole words, case-insensitively, in order of first mention.

  A mention inside a longer one ("Surgery" in "Cosmetic / Plastic Surgery") does not count; the
  words of a multi-word label may be separated by any whitespace or none.
  """
  spans = []
  for label in labels:
    words = r"\s*".join(map(re.escape, label.split()))
    pattern = rf"(?<![\w-]){words}(?![\w-])"
    spans += [(m.start(), m.end(), label) for m in re.finditer(pattern, output, re.IGNORECASE)]
  maximal = [(start, end, label) for start, end, label in spans
             if not any(s <= start and end <= e and e - s > end - start for s, e, _ in spans)]
  return list(dict.fromkeys(label for _, _, label in sorted(maximal)))


def parse_option_letter(output: str, options: Sequence[str]) -> str:
  """An option letter read the way a person would, else ``MISSING``.

  In order: a letter after "answer"/"answer is" ("Answer: C"); a letter in parentheses ("(B)");
  a letter opening the output and followed by ``.``, ``)``, ``:`` or nothing ("B. Thiamine");
  a lone lower-case letter as the whole output ("c"); otherwise the one standalone capital option
  letter of the output, if there is exactly one. Letters inside words ("ADP", "B12") never count,
  nor "A" used as an article ("A deficiency of ...").
  """
  letters = "".join(options)
  cued = (rf"(?i:\banswer\b)(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])(?![\w-])",
          rf"\(([{letters}])\)",
          rf"^\s*([{letters}])(?:[.):]|\s*$)",
          rf"^\s*\(?([{letters.lower()}])\)?\.?\s*$")
  for pattern in cued:
    match = re.search(pattern, output)
    if match:
      return match.group(1).upper()
  standalone = {m.group(1) for m in re.finditer(rf"(?<![\w-])([{letters}])(?![\w-])", output)
                if not (m.group(1) == "A" and re.match(r"\s+[a-z]", output[m.end():]))}
  return standalone.pop() if len(standalone) == 1 else MISSING


# --------------------------------------------------------------------------------------------------
# Classification: PubMedQA, MedQA, MedMCQA, MTSample, BioNLI, MedNLI, DDI.


@dataclasses.dataclass(frozen=True)
class _ChoiceTask:
  """A single-label task: its choices in the release's order, whether the release lower-cases the
  output (all but MedQA/MedMCQA), and whether the fixed parser reads option letters or labels."""
  choices: tuple[str, ...]
  release_lower_case: bool = True
  option_letters: bool = False

  def parse(self, output: str, variant: Variant) -> str:
    if variant == "release":
      return parse_release_choice(output, self.choices, self.release_lower_case)
    if self.option_letters:
      return parse_option_letter(output, self.choices)
    mentions = find_label_mentions(output, self.choices)
    return mentions[0] if mentions else MISSING


_PUBMEDQA = _ChoiceTask(PUBMEDQA_LABELS)
_MEDQA = _ChoiceTask(MEDQA_OPTIONS, release_lower_case=False, option_letters=True)
_MEDMCQA = _ChoiceTask(MEDMCQA_OPTIONS, release_lower_case=False, option_letters=True)
_MTSAMPLE = _ChoiceTask(MTSAMPLE_SPECIALTIES)
_NLI = _ChoiceTask(NLI_LABELS)


def _classification_scores(targets: Sequence[str], parsed: Sequence[str]) -> dict[str, float]:
  """The release's aggregates: accuracy, weighted and macro F1 over the gold label set (the
  release builds it with ``list(set(golds))``; sorting it moves only the last ulp), and the share
  of outputs that named no choice."""
  labels = sorted(set(targets))
  return {
      "acc": metrics.accuracy(targets, parsed),
      "f1": metrics.f1(targets, parsed, average="weighted", labels=labels),
      "macro_f1": metrics.f1(targets, parsed, average="macro", labels=labels),
      "missing": float(np.mean([p == MISSING for p in parsed])),
  }


def _score_choice(task: _ChoiceTask, targets: Sequence[str], predictions: Sequence[str],
                  variant: Variant) -> dict[str, float]:
  _validated(targets, predictions, variant)
  _check_labels(targets, task.choices)
  return _classification_scores(targets, [task.parse(p, variant) for p in predictions])


def score_pubmedqa(targets: Sequence[str], predictions: Sequence[str],
                   variant: Variant) -> dict[str, float]:
  """PubMedQA; targets are "yes", "no" or "maybe"."""
  return _score_choice(_PUBMEDQA, targets, predictions, variant)


def score_medqa(targets: Sequence[str], predictions: Sequence[str],
                variant: Variant) -> dict[str, float]:
  """MedQA (USMLE, five options); targets are option letters "A" to "E"."""
  return _score_choice(_MEDQA, targets, predictions, variant)


def score_medmcqa(targets: Sequence[str], predictions: Sequence[str],
                  variant: Variant) -> dict[str, float]:
  """MedMCQA (four options); targets are option letters "A" to "D"."""
  return _score_choice(_MEDMCQA, targets, predictions, variant)


def score_mtsample(targets: Sequence[str], predictions: Sequence[str],
                   variant: Variant) -> dict[str, float]:
  """MTSamples specialty classification; targets are members of ``MTSAMPLE_SPECIALTIES``."""
  return _score_choice(_MTSAMPLE, targets, predictions, variant)


def score_bionli(targets: Sequence[str], predictions: Sequence[str],
                 variant: Variant) -> dict[str, float]:
  """BioNLI; targets are "entailment", "contradiction" or "neutral"."""
  return _score_choice(_NLI, targets, predictions, variant)


def score_mednli(targets: Sequence[str], predictions: Sequence[str],
                 variant: Variant) -> dict[str, float]:
  """MedNLI; targets are "entailment", "contradiction" or "neutral"."""
  return _score_choice(_NLI, targets, predictions, variant)


def score_ddi(targets: Sequence[str], predictions: Sequence[str],
              variant: Variant) -> dict[str, float]:
  """DDI 2013 relation classification; targets are members of ``DDI_LABELS``.

  Both variants demand exactly one distinct label in the output (an output listing several is
  ambiguous); the fixed one matches whole labels case-insensitively, so "DDI-interaction" is not
  "DDI-int" and "ddi-effect" is "DDI-effect".
  """
  _validated(targets, predictions, variant)
  _check_labels(targets, DDI_LABELS)
  if variant == "release":
    parsed = [parse_release_ddi(p) for p in predictions]
  else:
    mentions = [find_label_mentions(p, DDI_LABELS) for p in predictions]
    parsed = [m[0] if len(m) == 1 else MISSING for m in mentions]
  return _classification_scores(targets, parsed)


def score_hoc(targets: Sequence[Collection[str]], predictions: Sequence[str],
              variant: Variant) -> dict[str, float]:
  """Hallmarks of Cancer, multi-label; targets are sets of ``HOC_LABELS`` members.

  Macro F1 over all ten hallmarks. The release scores a hallmark absent from both gold and output
  as 0 (scikit-learn's 0/0 → 0), so even a perfect run stays below 1 when a hallmark never occurs
  in gold; the fixed variant scores such agreement as 1 and matches names case-insensitively.
  """
  _validated(targets, predictions, variant)
  for labels in targets:
    _check_labels(labels, HOC_LABELS)
  if variant == "release":
    parsed = [parse_release_hoc(p) for p in predictions]
  else:
    parsed = [frozenset(find_label_mentions(p, HOC_LABELS)) for p in predictions]
  # The release passes (predictions, golds) to f1_score swapped; per-label F1 is symmetric in them.
  zero_division = 0.0 if variant == "release" else 1.0
  return {"macro_f1": metrics.multilabel_macro_f1(targets, parsed, HOC_LABELS,
                                                  zero_division=zero_division)}


# --------------------------------------------------------------------------------------------------
# emrQA: extractive QA.


def _release_emrqa_characters(text: str) -> list[str]:
  """The release's ``normalize_text``: lower-case, join every non-punctuation character with a
  space, collapse whitespace. The result, split as its "F1" splits it, is the list of the text's
  non-space, non-punctuation characters: word boundaries are gone."""
  return [ch for ch in text.lower() if ch not in string.punctuation and not ch.isspace()]


def _release_emrqa_f1(target: str, prediction: str) -> float:
  """The release's ``compute_f1`` on those character lists: the number of DISTINCT shared characters
  over the number of characters, so "aab" against itself scores 2/3 and any reordering of an
  answer scores as the answer does. It returns the integer 0 for an empty or disjoint answer."""
  gold, predicted = _release_emrqa_characters(target), _release_emrqa_characters(prediction)
  if not gold or not predicted:
    return int(gold == predicted)
  common = len(set(gold) & set(predicted))
  if not common:
    return 0
  precision, recall = common / len(predicted), common / len(gold)
  return 2 * (precision * recall) / (precision + recall)


def score_emrqa(targets: Sequence[str], predictions: Sequence[str],
                variant: Variant) -> dict[str, float]:
  """emrQA; targets are the gold answer strings. Exact match and F1: the release's character-level
  versions, or SQuAD's."""
  _validated(targets, predictions, variant)
  if variant == "fixed":
    return {"exact_match": metrics.squad_exact_match(targets, predictions),
            "f1": metrics.squad_f1(targets, predictions)}
  pairs = list(zip(targets, predictions))
  return {
      "exact_match": float(np.mean([_release_emrqa_characters(t) == _release_emrqa_characters(p)
                                    for t, p in pairs])),
      "f1": float(np.mean([_release_emrqa_f1(t, p) for t, p in pairs])),
  }


# --------------------------------------------------------------------------------------------------
# i2b2 2010 NER: the model marks entities inline, <span class="problem">chest pain</span>.

_VOID_ELEMENTS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
                            "meta", "param", "source", "track", "wbr"})


@dataclasses.dataclass(frozen=True)
class _Element:
  start: int  # character span of the element's text in the plain text
  end: int
  cls: str | None  # first class name, as bs4's attrs["class"][0]
  depth: int  # 0 for a top-level element


class _TaggedText(html.parser.HTMLParser):
  """The plain text of an HTML fragment and the span, class and depth of each of its elements.

  Unclosed elements end with the text; a stray end tag is ignored; character references are
  decoded, comments dropped.
  """

  def __init__(self, markup: str):
    super().__init__(convert_charrefs=True)
    self._parts: list[str] = []
    self._length = 0
    self._open: list[tuple[str, str | None, int]] = []
    self.elements: list[_Element] = []
    self.feed(markup)
    self.close()
    while self._open:
      self._close_innermost()
    self.text = "".join(self._parts)

  def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    classes = (dict(attrs).get("class") or "").split()
    cls = classes[0] if classes else None
    if tag in _VOID_ELEMENTS:
      self.elements.append(_Element(self._length, self._length, cls, len(self._open)))
    else:
      self._open.append((tag, cls, self._length))

  def handle_endtag(self, tag: str) -> None:
    if any(name == tag for name, _, _ in self._open):
      while self._close_innermost() != tag:
        pass

  def handle_data(self, data: str) -> None:
    self._parts.append(data)
    self._length += len(data)

  def _close_innermost(self) -> str:
    tag, cls, start = self._open.pop()
    self.elements.append(_Element(start, self._length, cls, len(self._open)))
    return tag


def render_ner_html(tokens: Sequence[str], tags: Sequence[str]) -> str:
  """Gold (tokens, BIO tags) as the answer the i2b2 prompt asks for: the tokens joined by spaces,
  each entity wrapped in ``<span class="TYPE">``."""
  pieces = [html.escape(token, quote=False) for token in tokens]
  for kind, first, last in metrics.bio_entities(tags):
    pieces[first] = f'<span class="{kind}">{pieces[first]}'
    pieces[last] = f"{pieces[last]}</span>"
  return " ".join(pieces)


def _release_words(markup: str) -> list[tuple[str, str]]:
  """The release's ``parse_html``: top-level text split on whitespace is O; the whole text of each
  top-level element is one entity of the element's first class (nested tags keep the outer class;
  a classless wrapper such as ``<p>`` makes everything O). The release split element text with
  spaCy's en_core_web_lg tokenizer; whitespace stands in for it here."""
  parsed = _TaggedText(markup)
  words: list[tuple[str, str]] = []
  cursor = 0
  for element in sorted((e for e in parsed.elements if e.depth == 0),
                        key=lambda e: (e.start, e.end)):
    words += [(word, "O") for word in parsed.text[cursor:element.start].split()]
    kind = element.cls if element.cls in RELEASE_NER_CLASSES else None
    words += [(word, "O" if kind is None else f"{'I' if i else 'B'}-{kind}")
              for i, word in enumerate(parsed.text[element.start:element.end].split())]
    cursor = element.end
  return words + [(word, "O") for word in parsed.text[cursor:].split()]


def _continuation(tag: str) -> str:
  return f"I-{tag[2:]}" if tag.startswith("B-") else tag


def _release_align(predicted: list[tuple[str, str]],
                   gold: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
  """The release's ``align_tokens``: walk both token lists in lock-step; equal tokens pair up, a
  token that is a prefix of the other pairs with it and leaves the rest (tagged as a continuation)
  for the next step, and any other pair is skipped on both sides. Skipped tokens leave precision and
  recall alike, so a document shifted by one word drops out of the score."""
  predicted, gold = list(predicted), list(gold)
  aligned_predicted: list[str] = []
  aligned_gold: list[str] = []
  i = j = 0
  while i < len(predicted) and j < len(gold):
    (p_word, p_tag), (g_word, g_tag) = predicted[i], gold[j]
    if p_word == g_word:
      i, j = i + 1, j + 1
    elif g_word.startswith(p_word):
      gold[j] = (g_word[len(p_word):], _continuation(g_tag))
      i += 1
    elif p_word.startswith(g_word):
      predicted[i] = (p_word[len(g_word):], _continuation(p_tag))
      j += 1
    else:
      i, j = i + 1, j + 1
      continue
    aligned_predicted.append(p_tag)
    aligned_gold.append(g_tag)
  return aligned_predicted, aligned_gold


def _fixed_tags(markup: str, tokens: Sequence[str]) -> list[str]:
  """BIO tags for the gold tokens from a tagged output, aligned by characters.

  Tags are stripped; the outermost elements with an i2b2 class are the predicted entities,
  whatever wraps them. The non-space characters of the output and of the gold tokens are aligned
  (difflib, case-insensitive), so extra or missing words and different tokenisation shift nothing;
  a gold token belongs to the entity that covers more than half of its characters.
  """
  parsed = _TaggedText(markup)
  spans: list[_Element] = []
  for element in sorted((e for e in parsed.elements if e.cls in NER_CLASSES and e.end > e.start),
                        key=lambda e: (e.start, -e.end)):
    if not spans or element.start >= spans[-1].end:
      spans.append(element)
  owner = np.full(len(parsed.text), -1)
  for k, element in enumerate(spans):
    owner[element.start:element.end] = k
  predicted = [(ch.lower(), int(owner[i])) for i, ch in enumerate(parsed.text) if not ch.isspace()]
  gold = [(ch.lower(), t) for t, token in enumerate(tokens) for ch in token if not ch.isspace()]
  matcher = difflib.SequenceMatcher(None, [c for c, _ in gold], [c for c, _ in predicted],
                                    autojunk=False)
  votes = [collections.Counter() for _ in tokens]
  for a, b, size in matcher.get_matching_blocks():
    for k in range(size):
      votes[gold[a + k][1]][predicted[b + k][1]] += 1
  tags, previous = [], -1
  for token, counter in zip(tokens, votes):
    span, count = max(((s, c) for s, c in counter.items() if s >= 0), key=lambda sc: sc[1],
                      default=(-1, 0))
    if 2 * count <= sum(not ch.isspace() for ch in token):
      span = -1
    tags.append("O" if span < 0 else f"{'I' if span == previous else 'B'}-{spans[span].cls}")
    previous = span
  return tags


def score_i2b2(targets: Sequence[NerGold], predictions: Sequence[str],
               variant: Variant) -> dict[str, float]:
  """i2b2 2010 concept extraction; targets are (tokens, BIO tags) per document, predictions the
  tagged text. Micro entity precision, recall and F1 (seqeval)."""
  _validated(targets, predictions, variant)
  gold_tags, predicted_tags = [], []
  for (tokens, tags), output in zip(targets, predictions):
    if len(tokens) != len(tags):
      raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    if variant == "release":
      predicted, gold = _release_align(_release_words(output), list(zip(tokens, tags)))
    else:
      predicted, gold = _fixed_tags(output, tokens), list(tags)
    predicted_tags.append(predicted)
    gold_tags.append(gold)
  return metrics.entity_scores(gold_tags, predicted_tags)


# --------------------------------------------------------------------------------------------------
# Summarisation: PubMed abstracts, MIMIC-CXR findings → impression.


def _score_summaries(targets: Sequence[str], predictions: Sequence[str], variant: Variant,
                     bootstrap_seed: int,
                     bertscore_model_dir: str | None) -> dict[str, float | None]:
  _validated(targets, predictions, variant)
  if variant == "release":
    scores: dict[str, float | None] = metrics.rouge(targets, predictions, aggregate="bootstrap",
                                                    seed=bootstrap_seed)
    scores["bootstrap_seed"] = float(bootstrap_seed)
  else:
    scores = metrics.rouge(targets, predictions, aggregate="mean")
  scores["bert_score_f1"] = None if bertscore_model_dir is None else metrics.bertscore_f1(
      targets, predictions, model_dir=bertscore_model_dir, num_layers=BERTSCORE_NUM_LAYERS)
  return scores


def score_pubmed_summarization(targets: Sequence[str], predictions: Sequence[str], variant: Variant,
                               *, bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED,
                               bertscore_model_dir: str | None = None) -> dict[str, float | None]:
  """PubMed abstract summarisation: ROUGE-1/2/L F (release: median of 1,000 bootstrap means under
  ``bootstrap_seed``, which is reported; fixed: the mean) and BERTScore F1, which is ``None``
  (unavailable) unless a local encoder folder is given."""
  return _score_summaries(targets, predictions, variant, bootstrap_seed, bertscore_model_dir)


def score_mimic_cxr(targets: Sequence[str], predictions: Sequence[str], variant: Variant, *,
                    bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED,
                    bertscore_model_dir: str | None = None) -> dict[str, float | None]:
  """MIMIC-CXR impression summarisation; scored as ``score_pubmed_summarization``."""
  return _score_summaries(targets, predictions, variant, bootstrap_seed, bertscore_model_dir)


SCORERS: dict[str, Callable[..., dict[str, float | None]]] = {
    "pubmedqa": score_pubmedqa,
    "medqa": score_medqa,
    "medmcqa": score_medmcqa,
    "emrqa": score_emrqa,
    "i2b2": score_i2b2,
    "ddi": score_ddi,
    "hoc": score_hoc,
    "mtsample": score_mtsample,
    "pubmed_summarization": score_pubmed_summarization,
    "mimic_cxr": score_mimic_cxr,
    "bionli": score_bionli,
    "mednli": score_mednli,
}
