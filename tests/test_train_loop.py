"""The training loop end to end on CPU: resume after SIGTERM and kill -9 equals an uninterrupted run
bit for bit; logs, TensorBoard, gin configs and the final model folder; NaN policy; init checks.

Runs go through ``medllama-train``'s ``main`` in subprocesses (a killed process must really die) on a
2×2×2 mesh of virtual CPU devices, with a tiny LLaMA, a tiny SentencePiece model and a jsonl corpus
prepared by the real preparer.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf

import demo_workspace
from medllama_jax import checkpointing, loading, partitioning, tokenizer
from medllama_jax.config import get_config
from medllama_jax.demo import complete_checkpoints
from medllama_jax.model import Llama
from medllama_jax.train import loop

TOTAL_STEPS = 8
SAVE_EVERY = 2

# Kills the process (with the given signal) right after the save of step ``kill_at`` has started,
# i.e. in the middle of an asynchronous checkpoint write.
DRIVER = textwrap.dedent("""
    import os, sys
    from medllama_jax.cli import train as cli
    from medllama_jax.train import checkpoints
    kill_at, signum = int(sys.argv[1]), int(sys.argv[2])
    if kill_at:
      original = checkpoints.RunCheckpoints.save
      def save(self, step, *args, **kwargs):
        started = original(self, step, *args, **kwargs)
        if step == kill_at:
          os.kill(os.getpid(), signum)
        return started
      checkpoints.RunCheckpoints.save = save
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A tokenizer folder and a prepared ``redpajama`` corpus under ``data/``."""
  root = tmp_path_factory.mktemp("train_loop")
  demo_workspace.write_tokenizer(root / "tokenizer")
  demo_workspace.prepare_general_corpus(root, num_shards=2)
  return root


def gin_flags(ws, run_dir: str, **train_overrides) -> list[str]:
  bindings = {
      "medllama_jax.config.model_config.preset": '"tiny"',
      "medllama_jax.partitioning.make_mesh.data": 2,
      "medllama_jax.partitioning.make_mesh.fsdp": 2,
      "medllama_jax.partitioning.make_mesh.tensor": 2,
      "seqio_tasks.pretrain.register_pretrain_mixture.data_dir": f'"{ws / "data"}"',
      "seqio_tasks.pretrain.register_pretrain_mixture.vocabulary_path": f'"{ws / "tokenizer"}"',
      "seqio_tasks.pretrain.register_pretrain_mixture.group_rates": '{"general": 1}',
      "medllama_jax.train.optimizer.make_optimizer.peak_lr": 3e-3,
      "train.run_dir": f'"{run_dir}"',
      "train.mixture": "@seqio_tasks.pretrain.register_pretrain_mixture()",
      "train.tokenizer_dir": f'"{ws / "tokenizer"}"',
      "train.sequence_length": 32,
      "train.global_batch_size": 8,
      "train.total_steps": TOTAL_STEPS,
      "train.save_every": SAVE_EVERY,
      "train.log_every": 1,
      "train.eval_every": 4,
      "train.eval_batches": 2,
  }
  bindings.update({f"train.{k}": v for k, v in train_overrides.items()})
  return [f"--gin.{name}={value}" for name, value in bindings.items()]


# Sends SIGTERM to the process when the function MODULE.NAME is called, outside the training loop.
SIGTERM_DRIVER = textwrap.dedent("""
    import importlib, os, signal, sys
    from medllama_jax.cli import train as cli
    module, name = sys.argv[1].rsplit(".", 1)
    module = importlib.import_module(module)
    original = getattr(module, name)
    def interrupted(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGTERM)
      return original(*args, **kwargs)
    setattr(module, name, interrupted)
    sys.exit(cli.main(sys.argv[2:]))
""")


def run_cli(ws, run_dir: str, kill_at: int = 0, signum: int = 0,
            **train_overrides) -> subprocess.CompletedProcess:
  driver = ws / "driver.py"
  driver.write_text(DRIVER)
  args = [sys.executable, str(driver), str(kill_at), str(signum),
          "--gin_file", "mesh/data_fsdp_tensor_2x2x2.gin", *gin_flags(ws, run_dir, **train_overrides)]
  return subprocess.run(args, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def losses_by_step(run_dir: str) -> dict[int, float]:
  """The last logged training loss of each step (steps redone after a resume overwrite)."""
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        out[record["step"]] = record["loss"]
  return out


def tensorboard_steps(run_dir: str) -> dict[str, list[int]]:
  """Tag → the steps of its scalars, in the order TensorBoard reads them (files by name)."""
  steps: dict[str, list[int]] = {}
  for events in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(events):
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  return steps


def final_params(run_dir: str) -> dict:
  directory = os.path.join(run_dir, "final_model", checkpointing.PARAMS_DIR)
  return checkpointing.read_tensors(directory, checkpointing.params_metadata(directory))


def test_resume_after_sigterm_and_kill_equals_uninterrupted_run(workspace, tmp_path):
  straight = str(tmp_path / "straight")
  done = run_cli(workspace, straight)
  assert done.returncode == 0, done.stderr[-3000:]
  reference = losses_by_step(straight)
  assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))
  assert reference[TOTAL_STEPS] < reference[1]

  resumed = str(tmp_path / "resumed")
  # SIGTERM during step 3: the loop saves at the end of the next step and exits cleanly.
  stopped = run_cli(workspace, resumed, kill_at=3, signum=signal.SIGTERM)
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert complete_checkpoints(resumed) == [2, 4]
  assert not os.path.exists(os.path.join(resumed, "final_model"))
  # kill -9 right after the asynchronous save of step 6 started.
  killed = run_cli(workspace, resumed, kill_at=6, signum=signal.SIGKILL)
  assert killed.returncode == -signal.SIGKILL
  assert complete_checkpoints(resumed)[-1] in (4, 6)
  finished = run_cli(workspace, resumed)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "resuming at step" in finished.stderr

  assert losses_by_step(resumed) == reference  # exact float equality, every step
  # Steps redone after each resume replace their first records: every step is logged once.
  records = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, TOTAL_STEPS + 1))
  assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
  # TensorBoard likewise: the events past the restored step are dropped on resume.
  assert tensorboard_steps(resumed) == tensorboard_steps(straight)
  a, b = final_params(straight), final_params(resumed)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg="/".join(name))

  # What a run leaves behind: gin configs, TensorBoard events with train and eval scalars, a model
  # folder that loads.
  assert "train.total_steps = 8" in open(os.path.join(straight, "config.gin")).read()
  assert "make_optimizer.peak_lr = 0.003" in open(
      os.path.join(straight, "operative_config.gin")).read()
  tags = set()
  for events in glob.glob(os.path.join(straight, "tensorboard", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(events):
      tags.update(v.tag for v in event.summary.value)
  assert {"train/loss", "train/perplexity", "train/learning_rate", "train/grad_norm",
          "train/tokens_per_s", "train/step_time_s", "eval/loss"} <= tags
  evals = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))
           if json.loads(l)["split"] == "eval"]
  assert [e["step"] for e in evals] == [4, 8] and all(np.isfinite(e["loss"]) for e in evals)
  mesh = partitioning.make_mesh(1, 1, 1)
  loaded = loading.load_model(os.path.join(straight, "final_model"), mesh)
  assert loaded.config.to_hf_dict() == get_config("tiny").to_hf_dict()
  assert loaded.tokenizer.encode("the heart") == tokenizer.load_tokenizer(
      str(workspace / "tokenizer")).encode("the heart")


@pytest.mark.parametrize("function,stage", [
    ("medllama_jax.data.pipeline.make_data_iterator", "setting up the run"),
    ("medllama_jax.loading.save_model", "writing the final model folder")])
def test_sigterm_outside_the_loop_says_what_it_interrupted_and_a_rerun_completes(
    workspace, tmp_path, function, stage):
  run_dir = str(tmp_path / "run")
  driver = workspace / "sigterm_driver.py"
  driver.write_text(SIGTERM_DRIVER)
  flags = ["--gin_file", "mesh/data_fsdp_tensor_2x2x2.gin",
           *gin_flags(workspace, run_dir, total_steps=2, eval_every=0)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  interrupted = subprocess.run([sys.executable, str(driver), function, *flags],
                               capture_output=True, text=True, timeout=600, env=env)
  assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr[-3000:]
  last = interrupted.stderr.strip().splitlines()[-1]
  assert last.startswith(f"medllama-train: terminated by SIGTERM during: {stage}"), last
  assert "rerun the same command" in last and "Traceback" not in interrupted.stderr
  assert not os.path.exists(os.path.join(run_dir, "final_model"))
  finished = run_cli(workspace, run_dir, total_steps=2, eval_every=0)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert os.path.isdir(os.path.join(run_dir, "final_model", checkpointing.PARAMS_DIR))


def write_model_folder(directory: str, config, nan: bool = False) -> str:
  mesh = partitioning.make_mesh(1, 1, 1)
  params = partitioning.init_params(Llama(config), mesh, partitioning.logical_axis_rules(),
                                    jax.random.key(1))
  if nan:
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(np.nan)
  checkpointing.save_params(os.path.join(directory, checkpointing.PARAMS_DIR), params)
  config.save_hf_json(directory)
  return directory


@pytest.fixture
def in_process_gin(workspace, tmp_path):
  import seqio_tasks.pretrain  # noqa: F401  (gin configurables)

  def configure(**train_overrides):
    gin.clear_config()
    flags = gin_flags(workspace, str(tmp_path / "run"), **train_overrides)
    gin.parse_config([flag[len("--gin."):].replace("=", " = ", 1) for flag in flags])

  yield configure
  gin.clear_config()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_stops_before_any_checkpoint(in_process_gin, tmp_path, policy):
  init = write_model_folder(str(tmp_path / "nan_model"), get_config("tiny"), nan=True)
  in_process_gin(init_checkpoint=f'"{init}"', on_non_finite=f'"{policy}"',
                 max_consecutive_skips=2)
  with pytest.raises(loop.NonFiniteLossError, match="step 1: loss nan"):
    loop.train()
  assert complete_checkpoints(str(tmp_path / "run")) == []


def test_init_checkpoint_with_other_architecture_is_refused(in_process_gin, tmp_path):
  init = write_model_folder(str(tmp_path / "wide"), get_config("tiny", intermediate_size=192))
  in_process_gin(init_checkpoint=f'"{init}"')
  with pytest.raises(ValueError, match=r"config.json does not match .*intermediate_size: "
                                       r"checkpoint 192 vs configured 176"):
    loop.train()


def test_init_checkpoint_parameters_are_the_starting_point(in_process_gin, tmp_path):
  init = write_model_folder(str(tmp_path / "init"), get_config("tiny"))
  in_process_gin(init_checkpoint=f'"{init}"', total_steps=1, eval_every=0,
                 **{"save_every": 1})
  gin.bind_parameter("medllama_jax.train.optimizer.make_optimizer.peak_lr", 0.0)
  result = loop.train()
  start = checkpointing.read_tensors(os.path.join(init, "params"),
                                     checkpointing.params_metadata(os.path.join(init, "params")))
  end = final_params(str(tmp_path / "run"))
  for name in start:
    np.testing.assert_array_equal(start[name], end[name], err_msg="/".join(name))
  assert result.step == 1 and result.final_model_dir


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_task_evaluation_in_training_equals_evaluate_on_the_final_model(in_process_gin, workspace,
                                                                       tmp_path):
  """MIBE's medqa sample every 2 of 3 steps on the parameters in memory (2×2×2 mesh): results at
  steps 2 and 3 (the last), the scalars in metrics.jsonl, and at step 3 the same predictions and
  metrics as ``evaluate`` run afterwards on the saved final model on the same mesh (greedy
  generations equal token for token, metrics exactly, option log-likelihoods to 1e-6 relative)."""
  import seqio_tasks.mibe  # noqa: F401  (gin configurables)
  from medllama_jax.demo import demo_data_path
  from medllama_jax.eval import evaluator

  in_process_gin(total_steps=3, save_every=3, eval_every=0, task_eval="@TaskEvaluation()")
  gin.parse_config([
      "TaskEvaluation.task_names = @seqio_tasks.mibe.register_mibe_tasks()",
      "TaskEvaluation.every = 2", "TaskEvaluation.max_new_tokens = 8",
      "TaskEvaluation.batch_size = 4", "TaskEvaluation.write_predictions = True",
      f"register_mibe_tasks.data_dir = '{demo_data_path('mibe')}'",
      f"register_mibe_tasks.vocabulary_path = '{workspace / 'tokenizer'}'",
      "register_mibe_tasks.datasets = ['medqa']"])
  result = loop.train()
  run = tmp_path / "run"
  name = "mibe_medqa_0shot"
  assert sorted(os.listdir(run / "task_eval")) == ["step_2", "step_3"]
  for step in (2, 3):
    assert f"| {name} | fixed |" in (run / "task_eval" / f"step_{step}" / "results.md").read_text()
  during = json.loads((run / "task_eval" / "step_3" / "results.json").read_text())
  metrics = during["tasks"][name]["metrics"]
  assert "loglikelihood/acc" in metrics and "release/acc" in metrics
  logged = [r for r in read_jsonl(str(run / "metrics.jsonl")) if r["split"] == "task_eval"]
  assert [r["step"] for r in logged] == [2, 3]
  assert logged[1] == {"step": 3, "split": "task_eval",
                       **{f"{name}/{k}": v for k, v in metrics.items()}}

  gin.clear_config()
  after_dir = tmp_path / "after"
  after = evaluator.evaluate(result.final_model_dir, [name], str(after_dir), max_new_tokens=8,
                             batch_size=4, mesh="2,2,2", write_predictions=True)
  assert after[name] == metrics
  predicted = read_jsonl(str(run / "task_eval" / "step_3" / "predictions" / f"{name}.jsonl"))
  expected = read_jsonl(str(after_dir / "predictions" / f"{name}.jsonl"))
  assert [p["prediction"] for p in predicted] == [p["prediction"] for p in expected]
  np.testing.assert_allclose([p["option_loglikelihoods"] for p in predicted],
                             [p["option_loglikelihoods"] for p in expected], rtol=1e-6)
