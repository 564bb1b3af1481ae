"""``medllama-eval`` end to end on a tiny random model folder and the MIBE fixtures: flags and gin
forms finish, write every metric to results.json/results.md and TensorBoard, and per-example
predictions only when asked."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import seqio

from medllama_jax import checkpointing, partitioning, tokenizer
from medllama_jax.config import get_config
from medllama_jax.demo import demo_text_path
from medllama_jax.eval import cli, evaluator
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
  for name in names:
    task = results["tasks"][name]
    assert task["prompt_variant"] == "release" and task["num_shots"] == 0
    assert task["num_examples"] == 3 and task["fewshot_seed"] == 1234
    assert set(task["metrics"]) == expected_keys(name)
    for key in task["metrics"]:
      scoring, metric = key.rsplit("/", 1)
      assert f"| {name} | {scoring} |" in table and f" {metric} |" in table.splitlines()[2]
  assert "loglikelihood/acc" in results["tasks"]["mibe_pubmedqa_0shot"]["metrics"]
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
