"""Our results beside the paper's: the published Table 3 numbers appear exactly as printed, in the
``release`` row of each zero-shot MIBE task, in results.md and results.json; unknown model names
are refused with the list of known ones (library, gin binding and ``medllama-eval`` flag)."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest

from medllama_jax.cli import eval as cli
from medllama_jax.eval import evaluator, paper
from seqio_tasks import mibe

# The paper's Table 3 (zero-shot), copied as printed: dataset, metric, then LLaMA2-13B,
# Me-LLaMA-13B, Me-LLaMA-13B-chat, LLaMA2-70B, Me-LLaMA-70B, Me-LLaMA-70B-chat.
PUBLISHED = """\
PubMedQA | acc | 0.216 | 0.266 | 0.700 | 0.132 | 0.682 | 0.768
MedQA | acc | 0.000 | 0.000 | 0.427 | 0.005 | 0.281 | 0.523
MedMCQA | acc | 0.003 | 0.003 | 0.449 | 0.012 | 0.447 | 0.539
emrQA | F1 | 0.038 | 0.122 | 0.307 | 0.000 | 0.172 | 0.346
i2b2 | F1 | 0.008 | 0.030 | 0.263 | 0.181 | 0.224 | 0.329
DDI | macro-F1 | 0.035 | 0.036 | 0.214 | 0.034 | 0.118 | 0.283
HoC | macro-F1 | 0.253 | 0.210 | 0.335 | 0.255 | 0.252 | 0.544
MTSample | macro-F1 | 0.042 | 0.072 | 0.229 | 0.066 | 0.226 | 0.384
PubMed | ROUGE-L | 0.170 | 0.168 | 0.116 | 0.167 | 0.119 | 0.169
MIMIC-CXR | ROUGE-L | 0.051 | 0.172 | 0.400 | 0.059 | 0.137 | 0.418
BioNLI | macro-F1 | 0.109 | 0.060 | 0.195 | 0.285 | 0.499 | 0.436
MedNLI | macro-F1 | 0.172 | 0.206 | 0.472 | 0.265 | 0.256 | 0.675"""
MODELS = ("LLaMA2-13B", "Me-LLaMA-13B", "Me-LLaMA-13B-chat", "LLaMA2-70B", "Me-LLaMA-70B",
          "Me-LLaMA-70B-chat")
PAPER_NAMES = {"PubMedQA": "pubmedqa", "MedQA": "medqa", "MedMCQA": "medmcqa", "emrQA": "emrqa",
               "i2b2": "i2b2", "DDI": "ddi", "HoC": "hoc", "MTSample": "mtsample",
               "PubMed": "pubmed_summarization", "MIMIC-CXR": "mimic_cxr", "BioNLI": "bionli",
               "MedNLI": "mednli"}
# What each of our scorers reports for the metric the paper prints.
OUR_KEYS = {"acc": "release/acc", "F1": "release/f1", "macro-F1": "release/macro_f1",
            "ROUGE-L": "release/rougeL"}


def published_rows() -> dict[str, tuple[str, dict[str, str]]]:
  rows = {}
  for line in PUBLISHED.splitlines():
    name, metric, *values = (cell.strip() for cell in line.split("|"))
    rows[PAPER_NAMES[name]] = (metric, dict(zip(MODELS, values, strict=True)))
  return rows


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> list[evaluator.TaskResult]:
  """A zero-shot result for every MIBE dataset (release and fixed scorings), a 5-shot PubMedQA
  and MMLU, none of which the paper's table covers."""
  out = []
  for dataset, (metric, _) in published_rows().items():
    for shots in (0, 5) if dataset == "pubmedqa" else (0,):
      name = mibe.task_name(dataset, shots)
      monkeypatch.setitem(mibe.TASKS, name, mibe.MibeTask(dataset, shots, "release", 1234, "d"))
      key = OUR_KEYS[metric].split("/")[1]
      out.append(evaluator.TaskResult(name, {f"release/{key}": 0.5, f"fixed/{key}": 0.25}, [], 0))
  monkeypatch.setitem(mibe.TASKS, "mibe_mmlu_0shot", mibe.MibeTask("mmlu", 0, "release", 1, "d"))
  out.append(evaluator.TaskResult("mibe_mmlu_0shot", {"release/acc": 0.5}, [], 0))
  return out


def table_cells(table: str) -> dict[tuple[str, str], list[str]]:
  lines = [line for line in table.splitlines() if line.startswith("| mibe_")]
  return {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
          for line in lines}


@pytest.mark.parametrize("model", MODELS)
def test_table_shows_the_published_numbers_as_printed(results, model: str):
  table = evaluator.markdown_table(results, paper_model=model)
  header = table.splitlines()[0]
  assert header.endswith(f"| paper: {model} |")
  cells = table_cells(table)
  for dataset, (metric, values) in published_rows().items():
    task = mibe.task_name(dataset, 0)
    assert cells[task, "release"][-1] == f"{metric} {values[model]}"
    assert cells[task, "fixed"][-1] == ""
    assert paper.METRICS[dataset].key == OUR_KEYS[metric]
  assert cells["mibe_pubmedqa_5shot", "release"][-1] == ""
  assert cells["mibe_mmlu_0shot", "release"][-1] == ""
  assert paper.SOURCE in table
  assert "paper:" not in evaluator.markdown_table(results)


def test_results_json_records_the_published_values(results, tmp_path: Path):
  settings = evaluator.EvalSettings()
  evaluator.write_results(str(tmp_path), "model", results, settings, False, 0,
                          paper_model="Me-LLaMA-13B-chat")
  written = json.loads((tmp_path / "results.json").read_text())["paper"]
  assert (written["model"], written["source"], written["scoring"]) == (
      "Me-LLaMA-13B-chat", paper.SOURCE, "release")
  expected = {mibe.task_name(dataset, 0): {"metric": metric, "key": OUR_KEYS[metric],
                                           "published": float(values["Me-LLaMA-13B-chat"])}
              for dataset, (metric, values) in published_rows().items()}
  assert written["tasks"] == expected
  assert "| acc 0.700 |" in (tmp_path / "results.md").read_text()


def test_unknown_model_names_list_the_known_ones(results, capsys: pytest.CaptureFixture):
  known = ", ".join(MODELS)
  with pytest.raises(ValueError, match=f"no model 'Me-LLaMA-7B'.*Table 3 has {known}$"):
    evaluator.markdown_table(results, paper_model="Me-LLaMA-7B")
  with pytest.raises(ValueError, match="no model 'GPT-4'"):
    paper.published("GPT-4", "pubmedqa")
  assert paper.published("Me-LLaMA-70B", "mmlu") is None
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["--compare_to_paper", "Me-LLaMA-7B"])
  err = capsys.readouterr().err
  assert "invalid choice: 'Me-LLaMA-7B'" in err and all(m in err for m in MODELS)


def test_gin_binding_is_checked_before_evaluating(capsys: pytest.CaptureFixture):
  parser = cli.build_parser()
  try:
    gin.parse_config(f"{cli.PAPER_MODEL_BINDING} = 'Me-LLaMA-13b'")
    with pytest.raises(SystemExit):
      cli._compare_to_paper(parser, None)
    assert "no model 'Me-LLaMA-13b'" in capsys.readouterr().err
    cli._compare_to_paper(parser, "Me-LLaMA-13B")  # the flag overrides the binding
    assert gin.query_parameter(cli.PAPER_MODEL_BINDING) == "Me-LLaMA-13B"
  finally:
    gin.clear_config()
