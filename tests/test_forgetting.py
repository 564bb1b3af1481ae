"""The forgetting report (``medllama-forgetting``), run checkpoints as models, and harness tasks in
the trainer's ``TaskEvaluation``, on a tiny LLaMA with a SentencePiece tokenizer, a local
multiple-choice harness task over a jsonl file and MIBE's shipped MedQA sample.

lm_eval's ``TaskManager`` indexes its ~15,000 shipped tasks (about 20 s on two cores) every time
one is made; the tests name only their local task, so the index is limited to ``include_path``.
"""

from __future__ import annotations

import functools
import glob
import json
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import gin  # noqa: E402
import jax  # noqa: E402
import lm_eval.tasks  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import seqio_tasks.mibe  # noqa: E402
import seqio_tasks.pretrain  # noqa: E402, F401  (gin configurables)
import demo_workspace  # noqa: E402
from medllama_jax import checkpointing, loading, partitioning  # noqa: E402
from medllama_jax.cli import forgetting as forgetting_cli  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.demo import demo_data_path  # noqa: E402
from medllama_jax.eval import evaluator, forgetting, harness  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402
from medllama_jax.train import loop, task_eval  # noqa: E402

TASK = "fg_choice"
MIBE_TASK = "mibe_medqa_0shot"
MESH = "1,1,1"
QUESTIONS = [("The patient presented with", [" fever", " a cough", " pain"], 0),
             ("Blood pressure was", [" high", " low and stable"], 1),
             ("Metformin is used for", [" diabetes", " fractures", " asthma"], 0),
             ("The chest X-ray showed", [" pneumonia", " nothing", " a fracture"], 2),
             ("Aspirin reduces", [" fever", " hair growth"], 0),
             ("The heart pumps", [" blood", " air", " bile"], 0)]
TASK_YAML = """task: fg_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(autouse=True)
def local_task_index(monkeypatch):
  monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                      functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
  gin.clear_config()
  yield
  gin.clear_config()


def write_model(directory: str, seed: int, tok_dir: str) -> str:
  config = get_config("tiny")
  mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  params = partitioning.init_params(Llama(config), mesh, partitioning.logical_axis_rules(),
                                    jax.random.key(seed))
  return loading.save_model(directory, params, config, tok_dir)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """A tokenizer, two tiny models (seeds 1 and 2), the harness task and a prepared corpus."""
  root = tmp_path_factory.mktemp("forgetting")
  tok_dir = demo_workspace.write_tokenizer(root / "tokenizer")
  tasks = root / "tasks"
  tasks.mkdir()
  data = tasks / f"{TASK}.jsonl"
  data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                          for q, c, a in QUESTIONS))
  (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(data=data))
  demo_workspace.prepare_general_corpus(root, num_shards=1)
  return {"root": root, "tokenizer": str(tok_dir), "tasks": str(tasks),
          "base": write_model(str(root / "base"), 1, str(tok_dir)),
          "other": write_model(str(root / "other"), 2, str(tok_dir))}


def one_device_mesh():
  return partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def test_report_of_two_models_has_values_and_deltas_as_direct_runs(ws, tmp_path):
  """Base and a differently seeded model on the harness task and MedQA (flags over
  forgetting.gin): the JSON's values equal
  the harness and the evaluator run directly, every delta is value − base value (0 for the base),
  and forgetting.md shows each as ``value (±delta)``."""
  out = tmp_path / "out"
  status = forgetting_cli.main([
      "--out", str(out), "--model", f"base={ws['base']}", "--model", f"seed2={ws['other']}",
      "--harness_tasks", TASK, "--include_path", ws["tasks"], "--mibe_tasks", "medqa",
      "--data_dir", demo_data_path("mibe"), "--max_new_tokens", "4", "--batch_size", "4",
      "--mesh", MESH, "--gin_file", "forgetting.gin"])
  assert status == 0
  report = json.loads((out / forgetting.JSON_FILE).read_text())
  assert report["base"] == "base"
  assert [m["name"] for m in report["models"]] == ["base", "seed2"]
  assert report["models"][1]["path"] == ws["other"]
  assert report["tasks"] == {"harness": [TASK], "mibe": ["medqa"]}
  # The flags over forgetting.gin's bindings.
  assert report["settings"]["include_path"] == ws["tasks"]
  assert report["settings"]["harness_tasks"] == [TASK]
  values, deltas = report["values"], report["deltas"]
  assert set(values["base"]) == {TASK, MIBE_TASK}

  other = loading.load_model(ws["other"], one_device_mesh())
  assert values["seed2"][TASK] == pytest.approx(
      harness.run_harness(harness.MedllamaLM(other, batch_size=4), [TASK], ws["tasks"])[TASK])
  seqio_tasks.mibe.register_mibe_tasks(demo_data_path("mibe"), ws["base"], datasets=["medqa"])
  direct = evaluator.evaluate(ws["base"], [MIBE_TASK], str(tmp_path / "direct"),
                              max_new_tokens=4, batch_size=4, mesh=MESH)
  assert values["base"][MIBE_TASK] == pytest.approx(evaluator.score_scalars(direct[MIBE_TASK]))

  table = (out / forgetting.MARKDOWN_FILE).read_text()
  for task in (TASK, MIBE_TASK):
    for metric, value in values["base"][task].items():
      if metric.endswith("_stderr"):
        assert metric not in deltas["base"][task]
        continue
      assert deltas["base"][task][metric] == 0
      change = values["seed2"][task][metric] - value
      assert deltas["seed2"][task][metric] == pytest.approx(change)
      sign = "+" if change >= 0 else forgetting.MINUS
      assert (f"| {task} | {metric} | {value:.3f} | {values['seed2'][task][metric]:.3f} "
              f"({sign}{abs(change):.3f}) |") in table
  assert (out / "models" / "seed2" / "mibe" / "results.json").exists()


def test_study_names_and_base_are_checked(ws, tmp_path):
  study = forgetting.ForgettingStudy(harness_tasks=[TASK], mesh=MESH)
  entries = [forgetting.ModelEntry("a", ws["base"]), forgetting.ModelEntry("a", ws["other"])]
  with pytest.raises(ValueError, match="must differ"):
    forgetting.study_forgetting(entries, study, str(tmp_path))
  with pytest.raises(ValueError, match="base 'b' is not one of"):
    forgetting.study_forgetting(entries[:1], study, str(tmp_path), base="b")
  with pytest.raises(ValueError, match="need data_dir"):
    forgetting.ForgettingStudy(mibe_tasks=["medqa"])
  assert forgetting_cli.main(["--out", str(tmp_path), "--model", "nodir"]) == 2


def train_run(ws, run_dir: str, extra: tuple[str, ...] = (), **train) -> loop.TrainResult:
  """A tiny 1-device training run on the prepared corpus (``train``: more ``train.*`` bindings;
  ``extra``: other bindings)."""
  bindings = {
      "medllama_jax.config.model_config.preset": '"tiny"',
      "medllama_jax.partitioning.make_mesh.fsdp": 1,
      "seqio_tasks.pretrain.register_pretrain_mixture.data_dir": f'"{ws["root"] / "data"}"',
      "seqio_tasks.pretrain.register_pretrain_mixture.vocabulary_path": f'"{ws["tokenizer"]}"',
      "seqio_tasks.pretrain.register_pretrain_mixture.group_rates": '{"general": 1}',
      "medllama_jax.train.optimizer.make_optimizer.peak_lr": 3e-3,
      "train.run_dir": f'"{run_dir}"',
      "train.mixture": "@seqio_tasks.pretrain.register_pretrain_mixture()",
      "train.tokenizer_dir": f'"{ws["tokenizer"]}"',
      "train.sequence_length": 32, "train.global_batch_size": 4, "train.log_every": 1,
      **{f"train.{k}": v for k, v in train.items()}}
  gin.clear_config()
  gin.parse_config([f"{name} = {value}" for name, value in bindings.items()] + list(extra))
  return loop.train()


def tensorboard_scalars(directory: str) -> dict[str, dict[int, float]]:
  """Tag → step → value of the event files under ``directory``."""
  out: dict[str, dict[int, float]] = {}
  for events in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(events):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def test_run_checkpoints_in_training_and_in_the_report(ws, tmp_path):
  """A 3-step run saving every step, with the harness task in its TaskEvaluation at step 3: the
  trainer logs the task's scalars; the last checkpoint loads as the final model's parameters; the
  report over the run (every 2nd checkpoint: step 1, and the final model for step 3) writes
  TensorBoard scalars at steps 1 and 3, the final model's equal to the trainer's own."""
  run_dir = tmp_path / "run"
  result = train_run(ws, str(run_dir), (
      f"TaskEvaluation.harness_tasks = ['{TASK}']", "TaskEvaluation.every = 3",
      f"TaskEvaluation.harness_include_path = '{ws['tasks']}'", "TaskEvaluation.batch_size = 8"),
      total_steps=3, save_every=1, keep_checkpoints=3, task_eval="@TaskEvaluation()")
  assert result.step == 3
  logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in logged if r["split"] == "task_eval"]
  assert [r["step"] for r in logged] == [3]
  during = json.loads((run_dir / task_eval.OUT_SUBDIR / "step_3" / task_eval.HARNESS_FILE)
                      .read_text())
  assert logged[0] == {"step": 3, "split": "task_eval",
                       **{f"{TASK}/{k}": v for k, v in during[TASK].items()}}

  mesh = one_device_mesh()
  assert loading.run_checkpoint_steps(str(run_dir)) == [1, 2, 3]
  last = loading.load_run_checkpoint(str(run_dir), 3, mesh)
  final = loading.load_model(result.final_model_dir, mesh)
  for (path, a), (_, b) in zip(checkpointing.flatten(last.params).items(),
                               checkpointing.flatten(final.params).items()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(path))

  gin.clear_config()
  out = tmp_path / "out"
  assert forgetting_cli.main(["--out", str(out), "--run", str(run_dir), "--every", "2",
                              "--harness_tasks", TASK, "--include_path", ws["tasks"],
                              "--batch_size", "8", "--mesh", MESH]) == 0
  report = json.loads((out / forgetting.JSON_FILE).read_text())
  assert [(m["name"], m["step"], m["checkpoint"]) for m in report["models"]] == [
      ("run@1", 1, True), ("run@3", 3, False)]
  assert report["values"]["run@3"][TASK] == pytest.approx(during[TASK])
  scalars = tensorboard_scalars(str(out / forgetting.TENSORBOARD_DIR / "run"))
  for metric in ("acc", "acc_norm"):
    values = {m: report["values"][m][TASK][metric] for m in ("run@1", "run@3")}
    assert scalars[f"forgetting/{TASK}/{metric}"] == pytest.approx({1: values["run@1"],
                                                                    3: values["run@3"]})
    assert scalars[f"forgetting_delta/{TASK}/{metric}"] == pytest.approx(
        {1: 0.0, 3: values["run@3"] - values["run@1"]})


def test_task_evaluation_with_harness_tasks_is_checked_at_start(ws):
  with pytest.raises(ValueError, match="unknown to lm_eval: nope"):
    task_eval.TaskEvaluation(harness_tasks=[TASK, "nope"], harness_include_path=ws["tasks"])
  with pytest.raises(ValueError, match="task_names is empty"):
    task_eval.TaskEvaluation()


def test_lora_run_checkpoint_is_the_base_with_its_adapters_unmerged(ws, tmp_path):
  """A 2-step LoRA run on the base model: its last checkpoint loads as the base plus the trained
  adapters, unmerged, and computes the logits of the merged final model (not the base's: the
  adapters have moved)."""
  from tests.helpers import forward

  run_dir = tmp_path / "lora_run"
  result = train_run(ws, str(run_dir), ("LoraConfig.rank = 4", "LoraConfig.alpha = 8.0"),
                     total_steps=2, save_every=2, init_checkpoint=f'"{ws["base"]}"',
                     lora="@LoraConfig()")
  mesh = one_device_mesh()
  unmerged = loading.load_run_checkpoint(str(run_dir), 2, mesh)
  assert unmerged.model.lora.rank == 4 and unmerged.tokenizer is not None
  merged = loading.load_model(result.final_model_dir, mesh)
  tokens = np.asarray([unmerged.tokenizer.encode("The patient presented with fever")])
  logits = forward(unmerged, tokens)
  np.testing.assert_allclose(logits, forward(merged, tokens), rtol=1e-4, atol=1e-5)
  assert np.abs(logits - forward(loading.load_model(ws["base"], mesh), tokens)).max() > 1e-4
