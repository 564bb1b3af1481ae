"""The supervised setting: its seqio Tasks render a training record exactly as the evaluator prompts
the test record (the chat template, loss on the answer and its EOS only); the mixture's rates; and
``medllama-supervised`` with the demo recipe end to end on a tiny model, where tuning on a
trivially learnable training split (every answer "yes") lifts the test score from 0 to 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
import seqio

import seqio_tasks.mibe
import seqio_tasks.supervised as supervised_tasks
from medllama_jax import checkpointing, partitioning, supervised
from medllama_jax.cli import supervised as supervised_cli
from medllama_jax.config import get_config
from medllama_jax.data import records
from medllama_jax.demo import train_tokenizer
from medllama_jax.eval import datasets, evaluator
from medllama_jax.model import Llama

DEMO_MIBE = Path(supervised_tasks.demo_data_dir())
# The demo recipe's model (gin/demo/supervised_demo.gin), whose architecture the base must have.
DEMO_MODEL = dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=4,
                  num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A model folder of the demo recipe's architecture, random weights drawn with numpy (compiling
  the initializer would cost more than this test's training), and a SentencePiece tokenizer."""
  model = tmp_path_factory.mktemp("supervised") / "base"
  train_tokenizer(str(model), DEMO_MODEL["vocab_size"])
  config = get_config("tiny", **DEMO_MODEL)
  abstract = partitioning.unbox(partitioning.abstract_params(Llama(config)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
  checkpointing.save_params(str(model / checkpointing.PARAMS_DIR), params)
  config.save_hf_json(str(model))
  return str(model)


def train_as_test(tmp_path: Path, dataset: str) -> str:
  """A data folder whose ``dataset`` evaluation set is its shipped training sample, so that the
  MIBE test Task and the supervised Task read the same records."""
  spec = datasets.get_spec(dataset)
  folder = tmp_path / dataset
  shutil.copytree(DEMO_MIBE / dataset, folder)
  shutil.copyfile(folder / spec.shot_files, folder / spec.test_files)
  return str(tmp_path)


@pytest.mark.parametrize("dataset", ["pubmedqa", "mimic_cxr", "i2b2", "hoc"])
def test_example_is_the_evaluation_prompt_then_the_answer(base_model: str, tmp_path: Path,
                                                          dataset: str):
  # mimic_cxr: a prompt ending in whitespace; i2b2: an HTML answer; hoc: a list of labels.
  data_dir = train_as_test(tmp_path, dataset)
  test_task = seqio.get_mixture_or_task(seqio_tasks.mibe.register_mibe_tasks(
      data_dir, base_model, datasets=[dataset])[0])
  name = supervised_tasks.register_supervised_task(dataset, data_dir, base_model)
  assert supervised_tasks.TASKS[name].num_examples == {"train": 3, "validation": 0}
  task = seqio.get_mixture_or_task(name)
  examples = {ex["id"].decode(): ex for ex in
              task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()}
  vocabulary = test_task.output_features["inputs"].vocabulary
  rows = list(test_task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
  assert len(examples) == len(rows) == 3
  for row in rows:
    example = examples[f"{dataset}/{row['index']}"]
    # What the evaluator feeds the model with --chat_template medllama, then the answer and EOS.
    prompt = evaluator.prompt_ids(row, vocabulary, "medllama")
    answer = vocabulary.encode(row["targets_pretokenized"].decode()) + [vocabulary.eos_id]
    assert example["targets"].tolist() == prompt + answer
    assert example["loss_weights"].tolist() == [0.0] * len(prompt) + [1.0] * len(answer)
    assert example["truncation"] == 0


def test_mixture_rates_are_training_examples_and_rates_override(base_model: str, tmp_path: Path):
  name = supervised_tasks.register_supervised_mixture(str(DEMO_MIBE), base_model)
  mixture = seqio.get_mixture_or_task(name)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  counts = {d: len(datasets.read_records(d, str(DEMO_MIBE / d), shots=True))
            for d in supervised_tasks.SUPERVISED_DATASETS}
  assert rates == {supervised_tasks.task_name(d): float(n) for d, n in counts.items()}
  assert supervised_tasks.train_examples(name) == sum(counts.values())

  name = supervised_tasks.register_supervised_mixture(
      str(DEMO_MIBE), base_model, datasets=["ddi", "bionli", "medqa"], rates={"bionli": 0.5,
                                                                             "medqa": 0},
      mixture_name="two")
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {"two_ddi": 3.0, "two_bionli": 0.5}
  assert supervised_tasks.train_examples(name) == counts["ddi"] + counts["bionli"]
  with pytest.raises(ValueError, match=r"rates name datasets \['hoc'\]"):
    supervised_tasks.register_supervised_mixture(str(DEMO_MIBE), base_model, datasets=["ddi"],
                                                 rates={"hoc": 1.0})
  with pytest.raises(KeyError, match="unknown dataset 'nope'"):
    supervised_tasks.register_supervised_mixture(str(DEMO_MIBE), base_model, datasets=["nope"])
  with pytest.raises(FileNotFoundError, match="MIBE dataset 'ddi'.*few-shot pool"):
    supervised_tasks.register_supervised_task("ddi", str(tmp_path), base_model)


def test_validation_split_is_held_out_by_id_and_an_empty_split_is_an_error(base_model: str):
  ids = ["pubmedqa/0", "pubmedqa/1", "pubmedqa/2"]
  expected = {split: [i for i in ids if records.split_of(i, 0.5) == split]
              for split in ("train", "validation")}
  name = supervised_tasks.register_supervised_task("pubmedqa", str(DEMO_MIBE), base_model,
                                                   validation_fraction=0.5, name="halves")
  assert supervised_tasks.TASKS[name].num_examples == {k: len(v) for k, v in expected.items()}
  task = seqio.get_mixture_or_task(name)
  for split, split_ids in expected.items():
    if split_ids:
      read = task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator()
      assert sorted(ex["id"].decode() for ex in read) == split_ids
  name = supervised_tasks.register_supervised_task("pubmedqa", str(DEMO_MIBE), base_model,
                                                   name="all_train")
  with pytest.raises(ValueError, match=r"pubmedqa .*no examples in split 'validation' "
                                       r"\(validation_fraction=0.0\)"):
    seqio.get_mixture_or_task(name).get_dataset(None, split="validation")


def write_always_yes(data_dir: Path, n_train: int, n_test: int) -> None:
  """PubMedQA records whose answer is always "yes": learnable from the training split alone."""
  def records(first: int, n: int) -> dict:
    return {str(90000100 + i): {"QUESTION": f"Does treatment {i} help patients?",
                                "CONTEXTS": [f"Patients received treatment {i}."],
                                "final_decision": "yes"} for i in range(first, first + n)}
  folder = data_dir / "pubmedqa"
  folder.mkdir(parents=True)
  (folder / "train_set.json").write_text(json.dumps(records(0, n_train)))
  (folder / "test_set.json").write_text(json.dumps(records(n_train, n_test)))


def test_demo_recipe_tunes_and_tabulates_before_and_after(base_model: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture):
  data_dir, out = tmp_path / "mibe", tmp_path / "out"
  write_always_yes(data_dir, n_train=16, n_test=4)
  shutil.copytree(DEMO_MIBE / "ddi", data_dir / "ddi")
  try:
    assert supervised_cli.main([
        "--gin_file=demo/supervised_demo.gin", f"--gin.OUT_DIR='{out}'",
        f"--gin.BASE_CHECKPOINT='{base_model}'", f"--gin.DATA_DIR='{data_dir}'",
        "--gin.run_supervised.datasets=['pubmedqa', 'ddi']"]) == 0
  finally:
    gin.clear_config()
  printed = capsys.readouterr().out
  results = json.loads((out / supervised.RESULTS_JSON).read_text())
  assert list(results["datasets"]) == ["pubmedqa", "ddi"]
  assert results["train_examples"] == 16 + 3
  assert results["train_steps"] == int(np.ceil(10 * 19 / 8))
  yes = results["datasets"]["pubmedqa"]
  assert (yes["metric"], yes["key"]) == ("acc", "release/acc")
  assert yes["before"] == 0.0 and yes["after"] == 1.0 and yes["delta"] == 1.0
  assert results["datasets"]["ddi"]["key"] == "release/macro_f1"
  table = (out / supervised.RESULTS_MD).read_text()
  assert "| pubmedqa | acc | release | 0.0000 | 1.0000 | +1.0000 |" in table
  assert "| ddi | macro-F1 | release |" in table
  assert table.split("\n\n", 1)[1] in printed
  for stage, model in (("before", base_model), ("after", results["tuned_model"])):
    stage_results = json.loads((out / stage / "results.json").read_text())
    assert stage_results["model"] == model
    assert stage_results["task_names"] == ["mibe_pubmedqa_0shot", "mibe_ddi_0shot"]
  assert Path(results["tuned_model"]) == out / "train" / "final_model"
  assert (out / "train" / "adapters" / "lora_config.json").exists()


def test_a_finished_evaluation_is_read_back_not_redone(tmp_path: Path, monkeypatch):
  tasks = ["mibe_ddi_0shot"]
  done = {"model": "base", "task_names": tasks,
          "tasks": {"mibe_ddi_0shot": {"metrics": {"release/macro_f1": 0.25}}}}
  (tmp_path / "results.json").write_text(json.dumps(done))
  calls = []
  monkeypatch.setattr(evaluator, "evaluate", lambda **kwargs: calls.append(kwargs) or {})
  assert supervised.evaluate_or_read(str(tmp_path), "base", tasks, "medllama", step=0) == {
      "mibe_ddi_0shot": {"release/macro_f1": 0.25}}
  assert not calls
  # Another model, or other tasks: evaluated again.
  supervised.evaluate_or_read(str(tmp_path), "tuned", tasks, "medllama", step=7)
  supervised.evaluate_or_read(str(tmp_path), "base", tasks + ["mibe_hoc_0shot"], "medllama", step=0)
  assert [(c["model_dir"], c["task_names"], c["chat_template"], c["step"]) for c in calls] == [
      ("tuned", tasks, "medllama", 7), ("base", tasks + ["mibe_hoc_0shot"], "medllama", 0)]
