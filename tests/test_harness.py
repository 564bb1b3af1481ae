"""lm-evaluation-harness on our model (``medllama_jax.eval.harness``) against lm_eval's own ``hf``.

One tiny random LLaMA with a SentencePiece LLaMA-2 tokenizer, saved as a Hugging Face folder and
converted to an Orbax model folder; three harness tasks defined here over local jsonl files (a
multiple-choice log-likelihood task, a rolling perplexity task, a generation task with stop
strings). ``max_length=32`` on both sides, so long contexts are truncated from the left and long
texts take several rolling windows. Per-example log-likelihoods agree within rtol=atol=1e-4
(float32 on both sides, different kernels); accuracies, greedy flags and generated texts are
identical; perplexities (functions of the log-likelihoods) agree within the same tolerance.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lm_eval  # noqa: E402

from medllama_jax import loading, lora, partitioning, tokenizer  # noqa: E402
from medllama_jax.cli import lm_eval as lm_eval_cli  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.eval import harness  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402
from medllama_jax.train import checkpoints, step as train_step  # noqa: E402
from tests import tokenizer_families  # noqa: E402
from tests.helpers import make_hf_model, save_hf_model  # noqa: E402

RTOL = ATOL = 1e-4
MAX_LENGTH = 32
TASKS = ("mj_choice", "mj_rolling", "mj_generate")
# One device, so that the runs share their compiled programs; the Orbax run uses a 2x2x2 mesh.
ARGS = dict(max_length=MAX_LENGTH, batch_size=4)
OURS = dict(ARGS, mesh="1,1,1")

CHOICE_DOCS = [
    {"question": "The patient presented with", "choices": [" fever", " a cough", " pain"],
     "answer": 0},
    {"question": "Blood pressure was", "choices": [" high", " low and stable"], "answer": 1},
    {"question": "A long history of the illness, the treatments tried and the reasons each of "
                 "them failed, written at length so that it does not fit the context window",
     "choices": [" surgery", " rest"], "answer": 0},
]
ROLLING_DOCS = [
    {"text": "The patient was admitted to the hospital."},
    {"text": "Aspirin reduces fever and pain. It is also used to prevent heart attacks and "
             "strokes in people at high risk, and the dose is lower for that use than for pain."},
]
GENERATE_DOCS = [
    {"prompt": "Question: what lowers fever?\nAnswer:", "target": " aspirin"},
    {"prompt": "The heart pumps", "target": " blood"},
    {"prompt": "Diagnosis:", "target": " flu"},
]

TASK_YAML = {
    "mj_choice": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "mj_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    # Stop strings a random model meets within a few ids: "e" cuts most generations short.
    "mj_generate": """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["e", "\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _write_tasks(folder) -> str:
  docs = {"mj_choice": CHOICE_DOCS, "mj_rolling": ROLLING_DOCS, "mj_generate": GENERATE_DOCS}
  folder.mkdir()
  for task, body in TASK_YAML.items():
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs[task]))
    header = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {data}\ntest_split: test\n")
    (folder / f"{task}.yaml").write_text(header + body)
  return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("harness")
  tok_dir = tokenizer_families.build("sentencepiece_llama2", root / "tok")
  hf_dir = save_hf_model(make_hf_model(vocab_size=512, max_position_embeddings=64), root / "hf")
  tokenizer.copy_tokenizer_files(tok_dir, hf_dir)
  orbax_dir = str(root / "orbax")
  hf.hf_to_orbax(hf_dir, orbax_dir)
  tasks_dir = _write_tasks(root / "tasks")
  # Our tasks alone: indexing lm_eval's own thousands of task files takes ~10 s each time.
  task_manager = lm_eval.tasks.TaskManager(include_path=tasks_dir, include_defaults=False)
  return {"hf": hf_dir, "orbax": orbax_dir, "tasks": tasks_dir, "root": root,
          "task_manager": task_manager}


def _evaluate(model, folders, tasks=TASKS, **kwargs):
  return lm_eval.simple_evaluate(model=model, tasks=list(tasks), log_samples=True,
                                 task_manager=folders["task_manager"], **kwargs)


@pytest.fixture(scope="module")
def hf_results(folders):
  return _evaluate("hf", folders, model_args=dict(pretrained=folders["hf"], dtype="float32",
                                                  **ARGS), device="cpu")


@pytest.fixture(scope="module")
def orbax_results(folders):
  # A 2x2x2 mesh over the eight test devices, written as model_args writes it.
  return _evaluate("medllama-jax", folders, model_args=dict(
      OURS, model=folders["orbax"], mesh="data=2;fsdp=2;tensor=2"))


@pytest.fixture(scope="module")
def hf_folder_lm(folders):
  return harness.MedllamaLM(folders["hf"], **OURS)


def _responses(results, task):
  return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _assert_loglikelihoods_match(ours, reference, task):
  ours, reference = _responses(ours, task), _responses(reference, task)
  assert len(ours) == len(reference)
  for got, want in zip(ours, reference):
    got, want = np.asarray(got, dtype=float).reshape(-1, 2), np.asarray(want, float).reshape(-1, 2)
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got[:, 1], want[:, 1])  # the greedy flags


def _assert_metrics_match(ours, reference, task):
  got, want = ours["results"][task], reference["results"][task]
  for key, value in want.items():
    if isinstance(value, float):
      np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def _assert_all_match(ours, reference):
  _assert_loglikelihoods_match(ours, reference, "mj_choice")
  for got, want in zip(_responses(ours, "mj_rolling"), _responses(reference, "mj_rolling")):
    np.testing.assert_allclose(np.ravel(got).astype(float), np.ravel(want).astype(float),
                               rtol=RTOL, atol=ATOL)
  assert _responses(ours, "mj_generate") == _responses(reference, "mj_generate")
  for task in TASKS:
    _assert_metrics_match(ours, reference, task)
  assert ours["results"]["mj_choice"]["acc,none"] == reference["results"]["mj_choice"]["acc,none"]


def test_orbax_folder_matches_hf_backend(orbax_results, hf_results):
  _assert_all_match(orbax_results, hf_results)
  # The truncated context and the several rolling windows were exercised.
  assert any(len(d["text"]) > 4 * MAX_LENGTH for d in ROLLING_DOCS)
  assert any(g != [""] for g in _responses(hf_results, "mj_generate"))


def test_hf_folder_matches_hf_backend(folders, hf_results, hf_folder_lm):
  ours = _evaluate(hf_folder_lm, folders)
  _assert_all_match(ours, hf_results)


def test_run_harness_metrics(folders, orbax_results, hf_folder_lm):
  metrics = harness.run_harness(hf_folder_lm, ["mj_choice", "mj_rolling"],
                                include_path=folders["tasks"])
  assert set(metrics) == {"mj_choice", "mj_rolling"}
  assert metrics["mj_choice"]["acc"] == orbax_results["results"]["mj_choice"]["acc,none"]
  assert "acc_stderr" in metrics["mj_choice"] and "alias" not in metrics["mj_choice"]
  np.testing.assert_allclose(metrics["mj_rolling"]["word_perplexity"],
                             orbax_results["results"]["mj_rolling"]["word_perplexity,none"],
                             rtol=RTOL)


def _random_adapters(base_dir, adapters_dir, mesh):
  """Adapters with nonzero A and B (fresh ones leave the model unchanged), saved as a folder."""
  config = loading.load_model(base_dir, mesh, with_tokenizer=False).config
  lora_config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
  adapters = lora.init_adapters(Llama(config, lora=lora_config), mesh,
                                partitioning.logical_axis_rules(), jax.random.key(3))
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  adapters = jax.tree.unflatten(treedef, [
      jax.device_put(0.3 * jax.random.normal(k, x.shape, x.dtype), x.sharding)
      for k, x in zip(keys, leaves)])
  return loading.save_adapters(adapters_dir, adapters, lora_config, base_model=base_dir)


def test_unmerged_adapters_match_merged_model(folders):
  mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  root = folders["root"]
  adapters_dir = _random_adapters(folders["orbax"], str(root / "adapters"), mesh)
  merged_dir = loading.merge_lora(folders["orbax"], adapters_dir, str(root / "merged"), mesh)
  unmerged = _evaluate(harness.MedllamaLM(folders["orbax"], adapters=adapters_dir, **OURS),
                       folders, tasks=["mj_choice", "mj_rolling"])
  merged = _evaluate(harness.MedllamaLM(merged_dir, **OURS), folders,
                     tasks=["mj_choice", "mj_rolling"])
  _assert_loglikelihoods_match(unmerged, merged, "mj_choice")
  _assert_metrics_match(unmerged, merged, "mj_rolling")


class _NoData:
  """The input-pipeline position a run checkpoint saves; nothing to save here."""

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)

  def restore(self, directory: str) -> None:
    pass


def test_run_checkpoint_matches_its_model_folder(folders, orbax_results):
  """A run folder is read at its latest checkpoint, with a named folder's config and tokenizer."""
  params = loading.load_model(folders["orbax"], partitioning.make_mesh(
      1, 1, 1, devices=jax.devices()[:1]), with_tokenizer=False).params
  run_dir = folders["root"] / "run"
  ckpts = checkpoints.RunCheckpoints(str(run_dir / "checkpoints"), save_every=1, async_save=False)
  state = train_step.TrainState(step=jnp.array(3, jnp.int32), params=params,
                                opt_state={"count": jnp.zeros((), jnp.int32)})
  assert ckpts.save(3, state, _NoData(), {})
  ckpts.close()
  ours = _evaluate(harness.MedllamaLM(str(run_dir), config_dir=folders["orbax"], **OURS), folders,
                   tasks=["mj_choice"])
  _assert_loglikelihoods_match(ours, orbax_results, "mj_choice")


def test_cli_runs_lm_eval_with_our_model(folders, orbax_results, tmp_path):
  out = tmp_path / "out"
  status = lm_eval_cli.main([
      "--model", "medllama-jax", "--model_args",
      f"model={folders['orbax']},mesh=1;1;1,max_length={MAX_LENGTH}", "--batch_size", "4",
      "--tasks", "mj_choice", "--include_path", folders["tasks"], "--output_path", str(out)])
  assert status == 0
  [results_file] = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
                    if f.startswith("results")]
  with open(results_file) as f:
    results = json.load(f)["results"]["mj_choice"]
  assert results["acc,none"] == orbax_results["results"]["mj_choice"]["acc,none"]
  np.testing.assert_allclose(results["acc_norm,none"],
                             orbax_results["results"]["mj_choice"]["acc_norm,none"])
