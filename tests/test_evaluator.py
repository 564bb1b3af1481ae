"""``medllama-eval`` end to end on a tiny random model folder and the MIBE fixtures: flags and gin
forms finish, write every metric to results.json/results.md and TensorBoard, and per-example
predictions only when asked."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import seqio

from medllama_jax import checkpointing, partitioning, tokenizer
from medllama_jax.config import get_config
from medllama_jax.demo import demo_text_path
from medllama_jax.cli import eval as cli
from medllama_jax.eval import evaluator
from medllama_jax.model import Llama

FIXTURES = Path(__file__).parent / "fixtures" / "mibe"
MESH = "1,1,1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """The folder ``demo.write_init_model`` writes (tiny config, vocabulary 512), its random weights
  drawn with numpy: compiling the model's initializer would take most of this test's time."""
  model = tmp_path_factory.mktemp("eval_model")
  config = get_config("tiny")
  abstract = partitioning.unbox(partitioning.abstract_params(Llama(config)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
  checkpointing.save_params(str(model / checkpointing.PARAMS_DIR), params)
  config.save_hf_json(str(model))
  model_file = tokenizer.train_sentencepiece(demo_text_path(), str(model / "tok"),
                                             config.vocab_size)
  Path(model_file).replace(model / tokenizer.SENTENCEPIECE_FILE)
  return str(model)


def expected_keys(task_name: str) -> set[str]:
  """What the task's metric functions report (run here on its own targets)."""
  task = seqio.get_mixture_or_task(task_name)
  rows = list(task.get_dataset(sequence_length=None, split="test", shuffle=False)
              .as_numpy_iterator())
  targets = [task.postprocess_fn(r["targets_pretokenized"], example=r, is_target=True)
             for r in rows]
  texts = [task.postprocess_fn(r["targets_pretokenized"], example=r) for r in rows]
  keys = {k for fn in task.predict_metric_fns for k in fn(targets, texts)}
  if task.score_metric_fns:
    scores = [[0.0] * len(r["options"]) for r in rows]
    keys |= {k for fn in task.score_metric_fns for k in fn(targets, scores)}
  return keys


def markdown_sections(text: str) -> tuple[list[str], list[str]]:
  """The table lines of results.md's two sections: the scores, then per task counts and seeds."""
  _, scores, tasks = text.split("\n## ")
  return ([line for line in scores.splitlines() if line.startswith("|")],
          [line for line in tasks.splitlines() if line.startswith("|")])


def test_flags_run_writes_results_without_predictions(model_dir: str, tmp_path: Path):
  out = tmp_path / "eval"
  assert cli.main(["--model", model_dir, "--data_dir", str(FIXTURES), "--out", str(out),
                   "--tasks", "pubmedqa,mimic_cxr", "--max_new_tokens", "4",
                   "--batch_size", "4", "--mesh", MESH]) == 0
  results = json.loads((out / "results.json").read_text())
  names = ["mibe_pubmedqa_0shot", "mibe_mimic_cxr_0shot"]
  assert results["task_names"] == names
  assert results["model"] == model_dir and results["max_new_tokens"] == 4
  table = (out / "results.md").read_text()
  scores, tasks = markdown_sections(table)
  for name in names:
    task = results["tasks"][name]
    assert task["prompt_variant"] == "release" and task["num_shots"] == 0
    assert task["num_examples"] == 3 and task["fewshot_seed"] == 1234
    assert task["truncated_prompts"] == 0
    assert set(task["metrics"]) == expected_keys(name)
    for key in task["metrics"]:
      scoring, metric = key.rsplit("/", 1)
      if metric in evaluator.SETTING_METRICS:
        assert f" {metric} |" not in scores[0]
      else:
        assert f"| {name} | {scoring} |" in table and f" {metric} |" in scores[0]
  # Counts and seeds are integers per task, the few-shot seed blank without shots.
  assert tasks[0] == ("| task | examples | truncated prompts | shots | few-shot seed "
                      "| bootstrap seed (release) |")
  assert "| mibe_pubmedqa_0shot | 3 | 0 | 0 |  |  |" in tasks
  assert "| mibe_mimic_cxr_0shot | 3 | 0 | 0 |  | 0 |" in tasks
  assert "loglikelihood/acc" in results["tasks"]["mibe_pubmedqa_0shot"]["metrics"]
  # No --bertscore_model: BERTScore is not computed, "n/a" in the table.
  summary = results["tasks"]["mibe_mimic_cxr_0shot"]["metrics"]
  assert summary["release/bert_score_f1"] is None and summary["fixed/bert_score_f1"] is None
  assert "n/a" in table
  assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
  assert not (out / "predictions").exists()


def test_gin_run_writes_predictions_when_asked(model_dir: str, tmp_path: Path):
  out = tmp_path / "eval"
  try:
    assert cli.main(["--gin_file=eval_mibe.gin", f"--gin.CHECKPOINT='{model_dir}'",
                     f"--gin.DATA_DIR='{FIXTURES}'", f"--gin.OUT_DIR='{out}'",
                     "--gin.register_mibe_tasks.datasets=['medqa']",
                     "--gin.evaluate.max_new_tokens=4", "--gin.evaluate.batch_size=4",
                     f"--gin.evaluate.mesh='{MESH}'", "--write_predictions"]) == 0
  finally:
    gin.clear_config()
  results = json.loads((out / "results.json").read_text())
  assert set(results["tasks"]["mibe_medqa_0shot"]["metrics"]) == expected_keys("mibe_medqa_0shot")
  lines = (out / "predictions" / "mibe_medqa_0shot.jsonl").read_text().splitlines()
  predictions = [json.loads(line) for line in lines]
  assert [p["index"] for p in predictions] == [0, 1, 2]
  assert [p["target"] for p in predictions] == ["A", "B", "C"]
  assert all(len(p["option_loglikelihoods"]) == 5 for p in predictions)


def test_results_md_shows_counts_and_seeds_as_integers_apart_from_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  """A 5-shot summarisation task with 2 of its 4 prompts cut, and a task from outside MIBE: the
  bootstrap seed is no score column, and the counts and seeds appear per task as integers;
  results.json keeps every key it had."""
  import seqio_tasks.mibe

  name = "mibe_pubmed_summarization_5shot"
  monkeypatch.setitem(seqio_tasks.mibe.TASKS, name, seqio_tasks.mibe.MibeTask(
      "pubmed_summarization", 5, "release", 1234, "d"))
  metrics = {"release/rouge1": 0.25, "release/bootstrap_seed": 7.0,
             "release/bert_score_f1": None, "fixed/rouge1": 0.5}
  results = [evaluator.TaskResult(name, metrics, [{}] * 4, 2),
             evaluator.TaskResult("other_task", {"fixed/acc": 1.0}, [{}] * 3, 0)]
  evaluator.write_results(str(tmp_path), "model", results, evaluator.EvalSettings(), False, 0)
  scores, tasks = markdown_sections((tmp_path / "results.md").read_text())
  assert scores == ["| task | scoring | rouge1 | bert_score_f1 | acc |", "|---|---|---|---|---|",
                    f"| {name} | release | 0.2500 | n/a |  |", f"| {name} | fixed | 0.5000 |  |  |",
                    "| other_task | fixed |  |  | 1.0000 |"]
  assert tasks == ["| task | examples | truncated prompts | shots | few-shot seed "
                   "| bootstrap seed (release) |", "|---|---|---|---|---|---|",
                   f"| {name} | 4 | 2 | 5 | 1234 | 7 |", "| other_task | 3 | 0 |  |  |  |"]
  written = json.loads((tmp_path / "results.json").read_text())["tasks"]
  assert written[name] == {"dataset": "pubmed_summarization", "num_shots": 5,
                           "prompt_variant": "release", "fewshot_seed": 1234, "data_dir": "d",
                           "num_examples": 4, "truncated_prompts": 2, "metrics": metrics}
  assert written["other_task"] == {"num_examples": 3, "truncated_prompts": 0,
                                   "metrics": {"fixed/acc": 1.0}}


def test_stop_sequences_and_prompt_fitting():
  text = "B. Thiamine\n\nQuestion: next"
  assert evaluator.cut_at_stop(text, ["Question", "\n\n"]) == "B. Thiamine"
  assert evaluator.cut_at_stop("no stop here", ["###"]) == "no stop here"
  assert evaluator.fit_prompt([1, 5, 6, 7, 8], 3) == [1, 7, 8]
  assert evaluator.fit_prompt([1, 5], 3) == [1, 5]


def test_chat_template_wraps_the_task_prompt_as_one_user_turn(model_dir: str):
  import seqio_tasks.mibe
  from medllama_jax import chat
  from medllama_jax.data.instruct import USER, Conversation, Turn

  name, = seqio_tasks.mibe.register_mibe_tasks(str(FIXTURES), model_dir, datasets=["pubmedqa"])
  task = seqio.get_mixture_or_task(name)
  row = next(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
  vocabulary = task.output_features["inputs"].vocabulary
  assert evaluator.prompt_ids(row, vocabulary, None) == row["inputs"].tolist()
  text = row["inputs_pretokenized"].decode()
  wrapped = evaluator.prompt_ids(row, vocabulary, "medllama")
  assert wrapped == chat.render_prompt(Conversation((Turn(USER, text),)), vocabulary, "medllama")
  decoded = vocabulary.decode(wrapped)
  assert decoded.startswith("Human:") and decoded.rstrip().endswith("Assistant:")
  assert "The answer is:" in decoded


def write_tiny_bert(directory: Path, texts: list[str], num_layers: int) -> str:
  """A random BERT encoder folder (``save_pretrained``) with a WordPiece vocabulary of the words of
  ``texts``: what a local bert-base-multilingual-cased folder provides, at toy size."""
  import re

  import torch
  import transformers

  words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
  directory.mkdir()
  (directory / "vocab.txt").write_text(
      "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
  transformers.BertTokenizer(str(directory / "vocab.txt"),
                             model_max_length=64).save_pretrained(str(directory))
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16,
                                   num_hidden_layers=num_layers, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)
  transformers.BertModel(config).eval().save_pretrained(str(directory))
  return str(directory)


def test_bertscore_model_is_used_for_the_summarisation_tasks(model_dir: str, tmp_path: Path):
  """--bertscore_model reaches both scorings of MIMIC-CXR: their bert_score_f1 equals
  ``bert_score.score`` on the same predictions and targets with the same encoder and layer (1e-6)."""
  import bert_score

  from medllama_jax.eval import scorers

  impressions = [json.loads(line)["impression"]
                 for line in (FIXTURES / "mimic_cxr" / "test.jsonl").read_text().splitlines()]
  encoder = write_tiny_bert(tmp_path / "encoder", impressions, scorers.BERTSCORE_NUM_LAYERS + 1)
  out = tmp_path / "eval"
  assert cli.main(["--model", model_dir, "--data_dir", str(FIXTURES), "--out", str(out),
                   "--tasks", "mimic_cxr", "--max_new_tokens", "6", "--batch_size", "4",
                   "--mesh", MESH, "--write_predictions", "--bertscore_model", encoder]) == 0
  metrics = json.loads((out / "results.json").read_text())["tasks"]["mibe_mimic_cxr_0shot"][
      "metrics"]
  records = [json.loads(line) for line in
             (out / "predictions" / "mibe_mimic_cxr_0shot.jsonl").read_text().splitlines()]
  assert [r["target"] for r in records] == impressions
  _, _, f1 = bert_score.score([r["prediction"] for r in records], impressions,
                              model_type=encoder, num_layers=scorers.BERTSCORE_NUM_LAYERS)
  for scoring in ("release", "fixed"):
    assert isinstance(metrics[f"{scoring}/bert_score_f1"], float)
    np.testing.assert_allclose(metrics[f"{scoring}/bert_score_f1"], float(f1.mean()), rtol=1e-6)


def test_bertscore_model_folder_is_checked_before_evaluating(model_dir: str, tmp_path: Path,
                                                            capsys):
  """A bad encoder folder fails at once, in one line, before anything is evaluated or written."""
  assert cli.main(["--model", model_dir, "--data_dir", str(FIXTURES), "--out", str(tmp_path / "e"),
                   "--tasks", "mimic_cxr", "--bertscore_model", str(tmp_path / "missing")]) == 1
  assert re.search(r"error: .*BERTScore encoder .*missing.*config.json", capsys.readouterr().err)
  (tmp_path / "unbounded").mkdir()
  (tmp_path / "unbounded" / "config.json").write_text("{}")
  (tmp_path / "unbounded" / "tokenizer_config.json").write_text("{}")
  assert cli.main(["--model", model_dir, "--data_dir", str(FIXTURES), "--out", str(tmp_path / "e"),
                   "--tasks", "mimic_cxr", "--bertscore_model", str(tmp_path / "unbounded")]) == 1
  assert "tokenizer_config.json: model_max_length is None" in capsys.readouterr().err
  assert not (tmp_path / "e").exists()
