"""The published MIBE numbers, to put beside ours.

Source: Me-LLaMA, npj Digital Medicine 2025 (doi 10.1038/s41746-025-01533-1), Table 3: zero-shot
results of the base and Me-LLaMA models on the twelve MIBE datasets, one metric per dataset. The
values are kept as the text the paper prints (three decimals), so a table shows them exactly as
published.

The paper scored every dataset with its release's evaluation code, which our ``release`` scorer
reproduces: :data:`METRICS` says, per dataset, the metric the paper reports and the key of our
results that corresponds to it (always a ``release/`` key). The paper's own name for a metric is
kept ("F1" for i2b2 is seqeval's micro entity F1; emrQA's "F1" is the release's character-set
overlap), so that a reader finds the column the paper has.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

SOURCE = ("Me-LLaMA, npj Digital Medicine 2025, doi 10.1038/s41746-025-01533-1, Table 3 "
          "(zero-shot)")
SCORING = "release"


@dataclasses.dataclass(frozen=True)
class PaperMetric:
  """``name``: the paper's column header; ``key``: our results' key for the same number."""
  name: str
  key: str


METRICS: Mapping[str, PaperMetric] = types.MappingProxyType({
    "pubmedqa": PaperMetric("acc", f"{SCORING}/acc"),
    "medqa": PaperMetric("acc", f"{SCORING}/acc"),
    "medmcqa": PaperMetric("acc", f"{SCORING}/acc"),
    "emrqa": PaperMetric("F1", f"{SCORING}/f1"),
    "i2b2": PaperMetric("F1", f"{SCORING}/f1"),
    "ddi": PaperMetric("macro-F1", f"{SCORING}/macro_f1"),
    "hoc": PaperMetric("macro-F1", f"{SCORING}/macro_f1"),
    "mtsample": PaperMetric("macro-F1", f"{SCORING}/macro_f1"),
    "pubmed_summarization": PaperMetric("ROUGE-L", f"{SCORING}/rougeL"),
    "mimic_cxr": PaperMetric("ROUGE-L", f"{SCORING}/rougeL"),
    "bionli": PaperMetric("macro-F1", f"{SCORING}/macro_f1"),
    "mednli": PaperMetric("macro-F1", f"{SCORING}/macro_f1"),
})

_DATASETS = tuple(METRICS)


def _column(*values: str) -> Mapping[str, str]:
  return types.MappingProxyType(dict(zip(_DATASETS, values, strict=True)))


# Model → dataset → the published value, rows in METRICS' order (PubMedQA ... MedNLI).
TABLE_3: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
    "LLaMA2-13B": _column("0.216", "0.000", "0.003", "0.038", "0.008", "0.035", "0.253", "0.042",
                          "0.170", "0.051", "0.109", "0.172"),
    "Me-LLaMA-13B": _column("0.266", "0.000", "0.003", "0.122", "0.030", "0.036", "0.210",
                            "0.072", "0.168", "0.172", "0.060", "0.206"),
    "Me-LLaMA-13B-chat": _column("0.700", "0.427", "0.449", "0.307", "0.263", "0.214", "0.335",
                                 "0.229", "0.116", "0.400", "0.195", "0.472"),
    "LLaMA2-70B": _column("0.132", "0.005", "0.012", "0.000", "0.181", "0.034", "0.255", "0.066",
                          "0.167", "0.059", "0.285", "0.265"),
    "Me-LLaMA-70B": _column("0.682", "0.281", "0.447", "0.172", "0.224", "0.118", "0.252",
                            "0.226", "0.119", "0.137", "0.499", "0.256"),
    "Me-LLaMA-70B-chat": _column("0.768", "0.523", "0.539", "0.346", "0.329", "0.283", "0.544",
                                 "0.384", "0.169", "0.418", "0.436", "0.675"),
})
MODELS: tuple[str, ...] = tuple(TABLE_3)


@dataclasses.dataclass(frozen=True)
class PublishedValue:
  model: str
  dataset: str
  metric: PaperMetric
  text: str  # as printed in the paper

  @property
  def value(self) -> float:
    return float(self.text)


def check_model(model: str) -> str:
  """``model`` if the paper reports it; otherwise a ValueError naming the models it does report."""
  if model not in TABLE_3:
    raise ValueError(f"the paper reports no model {model!r}; its Table 3 has {', '.join(MODELS)}")
  return model


def published(model: str, dataset: str) -> PublishedValue | None:
  """The paper's zero-shot value for ``model`` on ``dataset``; None for a dataset outside Table 3
  (MMLU); a ValueError for a model the paper does not report."""
  row = TABLE_3[check_model(model)]
  if dataset not in row:
    return None
  return PublishedValue(model, dataset, METRICS[dataset], row[dataset])
