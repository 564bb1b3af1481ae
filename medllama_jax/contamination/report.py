"""The contamination report, as JSON (every number) and Markdown (the tables a reader wants).

Per dataset: how many evaluation examples share at least one n-gram with the training data
(``contaminated_fraction``, over all its examples; those too short to have an n-gram are counted
in ``examples_without_ngrams`` and can never be contaminated), which ones (``contaminated_indices``,
medllama-eval's example ``index``), the fraction of the examples' distinct n-grams found in the
corpora (``ngram_fraction``: summed over examples, so long examples weigh more), the same per
source, and the corpus documents sharing the most n-grams with it. Per source: documents and words
read, documents overlapping any test example, records skipped as malformed.

The report holds ids, counts and indices only, never text: evaluation sets and corpora include
credentialed clinical notes, and a report is meant to be shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from medllama_jax.contamination.eval_sets import EvalSetIndex
from medllama_jax.contamination.scan import SourceTally, TopDocuments, example_coverage

JSON_FILE, MARKDOWN_FILE = "contamination.json", "contamination.md"


def _overlap(coverage: np.ndarray, mine: np.ndarray, ngrams: int) -> dict[str, Any]:
  contaminated = int(np.count_nonzero(coverage[mine]))
  return {"contaminated_examples": contaminated,
          "contaminated_fraction": contaminated / int(np.count_nonzero(mine)),
          "ngram_fraction": int(coverage[mine].sum()) / ngrams if ngrams else None}


def build_report(index: EvalSetIndex, tallies: Mapping[str, SourceTally], top: TopDocuments,
                 rejected: Mapping[str, Mapping[str, int]], settings: Mapping[str, Any]
                 ) -> dict[str, Any]:
  """The report's JSON. ``tallies`` and ``top``: what the scan kept, per source in the order the
  sources were given; ``rejected``: per source, malformed records by reason; ``settings`` (the
  inputs and options of the run) are copied in first."""
  found_anywhere = np.logical_or.reduce([t.found for t in tallies.values()])
  coverage = example_coverage(index, found_anywhere)
  source_coverage = {name: example_coverage(index, t.found) for name, t in tallies.items()}
  datasets = {}
  for number, dataset in enumerate(index.datasets):
    mine = index.example_dataset == number
    ngrams = int(index.example_ngrams[mine].sum())
    datasets[dataset] = {
        "examples": int(np.count_nonzero(mine)),
        "examples_without_ngrams": int(np.count_nonzero(index.example_ngrams[mine] == 0)),
        "ngrams": ngrams,
        **_overlap(coverage, mine, ngrams),
        "contaminated_indices": index.example_index[mine & (coverage > 0)].tolist(),
        "by_source": {name: _overlap(c, mine, ngrams) for name, c in source_coverage.items()},
        "top_documents": [dataclasses.asdict(m) for m in top.best(number)],
    }
  sources = {name: {"kind": t.kind, "documents": t.documents, "words": t.words,
                    "ngrams": t.ngrams, "documents_with_overlap": t.documents_with_overlap,
                    "rejected": dict(sorted(rejected[name].items()))}
             for name, t in tallies.items()}
  return {**settings, "n": index.n, "datasets": datasets, "sources": sources}


def _cell(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.2%}"
  return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  """A Markdown table; columns of numbers are right-aligned."""
  numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
             for i in range(len(header))]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
  return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def markdown(report: Mapping[str, Any]) -> str:
  """Tables: per dataset, per source, per dataset and source, and the top matching documents."""
  n, datasets, sources = report["n"], report["datasets"], report["sources"]
  lines = [f"# {n}-gram overlap of the evaluation sets with the training data", ""]
  lines += _table(
      ["dataset", "examples", f"shorter than {n} words", "contaminated", "fraction",
       "n-grams found"],
      [[name, d["examples"], d["examples_without_ngrams"], d["contaminated_examples"],
        d["contaminated_fraction"], d["ngram_fraction"]] for name, d in datasets.items()])
  lines += ["", "## Corpus sources", ""]
  lines += _table(
      ["source", "kind", "documents", "words", "documents overlapping", "records skipped"],
      [[name, s["kind"], s["documents"], s["words"], s["documents_with_overlap"],
        sum(s["rejected"].values())] for name, s in sources.items()])
  lines += ["", "## Contaminated examples by source", ""]
  lines += _table(
      ["dataset", *sources],
      [[name, *(d["by_source"][source]["contaminated_fraction"] for source in sources)]
       for name, d in datasets.items()])
  lines += ["", "## Documents sharing the most n-grams", ""]
  lines += _table(
      ["dataset", "source", "document id", "shared n-grams", "test examples (index)"],
      [[name, m["source"], m["id"], m["shared_ngrams"],
        ", ".join(map(str, m["examples"])) + (" ..." if m["num_examples"] > len(m["examples"])
                                              else "")]
       for name, d in datasets.items() for m in d["top_documents"]])
  if report.get("decontaminated"):
    lines += ["", "## Decontaminated copies", ""]
    lines += _table(
        ["source", "copy", "documents removed", "documents kept"],
        [[source, c["out_dir"], sum(c["removed"].values()), sum(c["records_written"].values())]
         for source, c in report["decontaminated"].items()])
  return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: Mapping[str, Any]) -> tuple[str, str]:
  """Writes ``contamination.json`` and ``contamination.md`` into ``out_dir``; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = os.path.join(out_dir, JSON_FILE), os.path.join(out_dir, MARKDOWN_FILE)
  with open(paths[0], "w", encoding="utf-8") as f:
    f.write(json.dumps(report, indent=2) + "\n")
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write(markdown(report))
  return paths
