"""Every gin file in gin/ parses and builds what it configures, without training or real weights."""

import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import seqio  # noqa: E402

import seqio_tasks.pretrain  # noqa: E402
from medllama_jax import config, demo, partitioning  # noqa: E402
from medllama_jax.data import token_stats  # noqa: E402
from medllama_jax.data.vocab import model_vocabulary  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"
MODEL_FILES = sorted((GIN_DIR / "models").glob("*.gin"))
MESH_FILES = sorted((GIN_DIR / "mesh").glob("*.gin"))


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_gin_builds_config_and_abstract_params(path):
  gin.parse_config_file(str(path))
  cfg = config.model_config()
  assert cfg == config.get_config(path.stem, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                                  attention_impl=cfg.attention_impl)
  params = partitioning.unbox(partitioning.abstract_params(Llama(cfg)))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == cfg.num_params()


@pytest.mark.parametrize("path", MESH_FILES, ids=lambda p: p.stem)
def test_mesh_gin_builds_mesh(path):
  gin.parse_config_file(str(path))
  mesh = partitioning.make_mesh()
  assert mesh.axis_names == partitioning.MESH_AXES
  bindings = gin.get_bindings("medllama_jax.partitioning.make_mesh")
  for axis, size in bindings.items():
    if size != -1:
      assert mesh.shape[axis] == size
  if -1 in bindings.values():
    assert mesh.devices.size == jax.device_count()


RECIPE_FILES = sorted(GIN_DIR.glob("pretrain_me_llama_*b.gin")) + [GIN_DIR / "demo" / "pretrain_demo.gin"]
EVAL_FILE = GIN_DIR / "eval_mibe.gin"
FORGETTING_FILE = GIN_DIR / "forgetting.gin"
# Included by the recipes, never parsed alone.
INCLUDED_FILES = [GIN_DIR / "pretrain_me_llama_common.gin"]


def test_every_gin_file_is_covered_by_a_test():
  covered = (set(MODEL_FILES) | set(MESH_FILES) | set(RECIPE_FILES) | set(INCLUDED_FILES)
             | set(INSTRUCT_RECIPE_FILES) | {EVAL_FILE} | set(SUPERVISED_RECIPE_FILES)
             | set(HARDWARE_FILES) | {FORGETTING_FILE})
  assert covered == set(GIN_DIR.rglob("*.gin"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The demo's corpus samples, prepared, and a tokenizer folder: what the recipes' macros name."""
  root = tmp_path_factory.mktemp("recipes")
  demo.prepare_corpora(str(root / "data"))
  demo.train_tokenizer(str(root / "model"), 1024)
  return root


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_builds_model_mesh_optimizer_and_mixture(path, prepared):
  from medllama_jax.cli import gin_flags as cli
  from medllama_jax.train import loop  # noqa: F401  (gin configurables)
  from medllama_jax.train import optimizer as optim

  cli.parse_gin([str(path)], [f"RUN_DIR = '{prepared / 'run'}'", f"DATA_DIR = '{prepared / 'data'}'",
                              f"INIT_CHECKPOINT = '{prepared / 'model'}'"], [])
  cfg = config.model_config()
  params = partitioning.unbox(partitioning.abstract_params(Llama(cfg)))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  mesh = partitioning.make_mesh()
  assert mesh.devices.size == jax.device_count()
  train = gin.get_bindings("medllama_jax.train.loop.train")
  _, schedule = optim.make_optimizer(total_steps=train["total_steps"])
  warmup = round(0.05 * train["total_steps"]) if "demo" not in path.stem else round(
      0.1 * train["total_steps"])
  peak = 3e-3 if "demo" in path.stem else 8e-6
  np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
  opt = gin.get_bindings("medllama_jax.train.optimizer.make_optimizer")
  assert (opt["weight_decay"], opt.get("b1", 0.9), opt.get("b2", 0.95)) == (1e-5, 0.9, 0.95)
  name = seqio_tasks.pretrain.register_pretrain_mixture()
  mixer = gin.get_bindings("seqio_tasks.pretrain.register_pretrain_mixture")
  assert mixer["rate_unit"] == "tokens" and mixer["sequence_length"] == train["sequence_length"]
  vocabulary = model_vocabulary(str(prepared / "model"))
  mixture = seqio.get_mixture_or_task(name)
  # Token rates: a task's rate times its tokens per example is its share of the trained tokens.
  token_weights = {
      corpus: mixture.get_rate(seqio.get_mixture_or_task(f"{name}_{corpus}"))
      * token_stats.tokens_per_example(token_stats.split_histogram(
          token_stats.token_stats(str(prepared / "data" / corpus), vocabulary), "train"),
          train["sequence_length"])
      for corpus in seqio_tasks.pretrain.CORPORA}
  expected = {"pubmed_abstracts": 7.5, "pmc_fulltext": 7.5, "mimic_iii_notes": 1 / 3,
              "mimic_iv_notes": 1 / 3, "mimic_cxr_reports": 1 / 3, "redpajama": 4.0}
  total = sum(token_weights.values())
  assert {c: w / total for c, w in token_weights.items()} == pytest.approx(
      {c: w / 20 for c, w in expected.items()})
  if "demo" not in path.stem:
    assert cfg.dtype == "bfloat16" and train["sequence_length"] == 4096
    assert train["global_batch_size"] * train["sequence_length"] * train["total_steps"] >= 129e9
    assert cfg.attention_impl == "splash"  # the TPU recipes run the Mosaic kernel


def test_recipes_named_from_the_repository_are_found_from_any_directory(prepared, tmp_path,
                                                                        monkeypatch):
  """``--gin_file=gin/...`` as the README writes it, run from a folder outside the checkout."""
  from medllama_jax.cli import gin_flags as cli
  from medllama_jax.train import loop  # noqa: F401  (gin configurables)

  monkeypatch.chdir(tmp_path)
  cli.parse_gin(["gin/pretrain_me_llama_13b.gin", "gin/hardware/gpu.gin"],
                [f"RUN_DIR = '{prepared / 'run'}'", f"DATA_DIR = '{prepared / 'data'}'",
                 f"INIT_CHECKPOINT = '{prepared / 'model'}'"], [])
  cfg = config.model_config()
  assert (cfg.hidden_size, cfg.attention_impl) == (5120, "cudnn")


HARDWARE_FILES = sorted((GIN_DIR / "hardware").glob("*.gin"))
EXPECTED_HARDWARE = {"tpu": ("splash", "bfloat16"), "gpu": ("cudnn", "bfloat16")}


@pytest.mark.parametrize("path", HARDWARE_FILES, ids=lambda p: p.stem)
def test_hardware_gin_after_a_recipe_sets_the_attention_kernel(path, prepared):
  """Given after a recipe (as its comment says to), the file decides the attention back-end."""
  from medllama_jax.cli import gin_flags as cli
  from medllama_jax.train import loop  # noqa: F401  (gin configurables)

  cli.parse_gin([str(GIN_DIR / "pretrain_me_llama_13b.gin"), str(path)],
                [f"RUN_DIR = '{prepared / 'run'}'", f"DATA_DIR = '{prepared / 'data'}'",
                 f"INIT_CHECKPOINT = '{prepared / 'model'}'"], [])
  cfg = config.model_config()
  assert (cfg.attention_impl, cfg.dtype) == EXPECTED_HARDWARE[path.stem]
  params = partitioning.unbox(partitioning.abstract_params(Llama(cfg)))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


INSTRUCT_RECIPE_FILES = sorted(GIN_DIR.glob("instruct_me_llama_*b.gin")) + [
    GIN_DIR / "demo" / "instruct_demo.gin"]


@pytest.fixture(scope="module")
def instruct_prepared(tmp_path_factory):
  """A file per instruction source (copies of the packaged sample) and a tokenizer folder."""
  import shutil

  import seqio_tasks.instruct

  root = tmp_path_factory.mktemp("instruct_recipes")
  (root / "data").mkdir()
  for source in seqio_tasks.instruct.SOURCES:
    shutil.copyfile(seqio_tasks.instruct.demo_sample_path(), root / "data" / f"{source}.jsonl")
  demo.train_tokenizer(str(root / "model"), 1024)
  return root


@pytest.mark.parametrize("path", INSTRUCT_RECIPE_FILES, ids=lambda p: p.stem)
def test_instruct_recipe_builds_model_mesh_optimizer_and_mixture(path, instruct_prepared):
  from medllama_jax.data import pipeline
  from medllama_jax.cli import gin_flags as cli
  from medllama_jax.train import loop  # noqa: F401  (gin configurables)
  from medllama_jax.train import optimizer as optim

  root = instruct_prepared
  cli.parse_gin([str(path)], [f"RUN_DIR = '{root / 'run'}'", f"DATA_DIR = '{root / 'data'}'",
                              f"INIT_CHECKPOINT = '{root / 'model'}'"], [])
  import seqio_tasks.instruct  # imported by the gin file itself

  cfg = config.model_config()
  params = partitioning.unbox(partitioning.abstract_params(Llama(cfg)))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  assert partitioning.make_mesh().devices.size == jax.device_count()
  train = gin.get_bindings("medllama_jax.train.loop.train")
  _, schedule = optim.make_optimizer(total_steps=train["total_steps"])
  demo_recipe = "demo" in path.stem
  from medllama_jax import lora
  adapters = gin.query_parameter("medllama_jax.train.loop.train.lora").scoped_configurable_fn()
  assert isinstance(adapters, lora.LoraConfig)
  assert (adapters.rank, adapters.alpha) == ((8, 16.0) if demo_recipe else (16, 32.0))
  assert cfg.attention_impl == ("xla" if demo_recipe else "splash")
  warmup, peak = (0.1, 1e-3) if demo_recipe else (0.03, 1e-5)
  np.testing.assert_allclose(float(schedule(round(warmup * train["total_steps"]))), peak, rtol=1e-6)
  if demo_recipe:
    name = seqio_tasks.instruct.register_instruct_task()
    assert name == "me_llama_instruct_demo"
    batch = next(pipeline.make_data_iterator(name, train["sequence_length"], 8, shard_index=0,
                                             num_shards=1))
    assert set(np.unique(batch["decoder_loss_weights"])) == {0.0, 1.0}
    return
  name = seqio_tasks.instruct.register_instruct_mixture()
  mixture = seqio.get_mixture_or_task(name)
  rates = {t.name.split(f"{name}_")[1]: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {s: float(source.samples) for s, source in seqio_tasks.instruct.SOURCES.items()}
  opt = gin.get_bindings("medllama_jax.train.optimizer.make_optimizer")
  assert (opt["b1"], opt["b2"], opt["weight_decay"]) == (0.9, 0.999, 0.0)
  assert gin.get_bindings("medllama_jax.data.pipeline.make_data_iterator")["pack"] is False
  assert cfg.dtype == "bfloat16" and train["sequence_length"] == 4096
  # Unpacked rows: one sample per row, so the steps cover 3 epochs of the 219,484 samples.
  epochs = train["global_batch_size"] * train["total_steps"] / sum(rates.values())
  assert 3 <= epochs < 3 + train["global_batch_size"] / sum(rates.values())


def test_eval_gin_registers_every_mibe_task_with_the_release_protocol(prepared):
  from medllama_jax.eval import evaluator  # noqa: F401  (gin configurables)
  from medllama_jax.cli import gin_flags as cli

  data = str(pathlib.Path(demo.demo_data_path("mibe")))
  cli.parse_gin([str(EVAL_FILE)], [f"CHECKPOINT = '{prepared / 'model'}'", f"DATA_DIR = '{data}'",
                                   f"OUT_DIR = '{prepared / 'eval'}'"], [])
  bindings = gin.get_bindings("medllama_jax.eval.evaluator.evaluate")
  assert (bindings["max_new_tokens"], bindings["stop_sequences"]) == (256, ())
  # No encoder folder by default: BERTScore is reported n/a.
  assert gin.get_bindings("seqio_tasks.mibe.register_mibe_tasks")["bertscore_model_dir"] is None
  import seqio_tasks.mibe

  names = seqio_tasks.mibe.register_mibe_tasks()
  assert len(names) == 12 and all(n.endswith("_0shot") for n in names)
  for name in names:
    assert next(iter(seqio.get_mixture_or_task(name).get_dataset(None, split="test",
                                                                  shuffle=False)))["inputs"].shape[0]


def test_forgetting_gin_builds_the_papers_general_task_set():
  """The study the file configures, with task names lm_eval knows."""
  import lm_eval.tasks
  from medllama_jax.cli import gin_flags as cli
  from medllama_jax.eval import forgetting

  cli.parse_gin([str(FORGETTING_FILE)], [], [])
  study = forgetting.ForgettingStudy()
  assert study.harness_tasks == forgetting.PAPER_GENERAL_TASKS
  assert (study.num_fewshot, study.limit, study.mibe_tasks) == (None, None, ())
  known = lm_eval.tasks.TaskManager().all_tasks
  assert [t for t in study.harness_tasks if t not in known] == []


SUPERVISED_RECIPE_FILES = [GIN_DIR / "supervised_me_llama_13b.gin",
                           GIN_DIR / "demo" / "supervised_demo.gin"]


@pytest.mark.parametrize("path", SUPERVISED_RECIPE_FILES, ids=lambda p: p.stem)
def test_supervised_recipe_builds_model_mesh_optimizer_and_mixture(path, instruct_prepared):
  from medllama_jax import lora
  from medllama_jax.cli import gin_flags as cli
  from medllama_jax.train import optimizer as optim

  root, demo_recipe = instruct_prepared, "demo" in path.stem
  data = demo.demo_data_path("mibe")
  cli.parse_gin([str(path)], [f"OUT_DIR = '{root / 'supervised'}'",
                              f"BASE_CHECKPOINT = '{root / 'model'}'", f"DATA_DIR = '{data}'"], [])
  import seqio_tasks.supervised  # imported by the gin file itself

  cfg = config.model_config()
  params = partitioning.unbox(partitioning.abstract_params(Llama(cfg)))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  assert partitioning.make_mesh().devices.size == jax.device_count()
  run = gin.get_bindings("medllama_jax.supervised.run_supervised")
  assert (run["data_dir"], run["template"]) == (data, "medllama")
  assert (run["epochs"], run["global_batch_size"]) == ((10.0, 8) if demo_recipe else (3.0, 128))
  adapters = gin.query_parameter("medllama_jax.train.loop.train.lora").scoped_configurable_fn()
  assert isinstance(adapters, lora.LoraConfig)
  assert (adapters.rank, adapters.alpha) == ((8, 16.0) if demo_recipe else (16, 32.0))
  assert cfg.attention_impl == ("xla" if demo_recipe else "splash")
  warmup, peak = (0.1, 1e-2) if demo_recipe else (0.03, 1e-5)
  _, schedule = optim.make_optimizer(total_steps=1000)
  np.testing.assert_allclose(float(schedule(round(warmup * 1000))), peak, rtol=1e-6)
  assert gin.get_bindings("medllama_jax.data.pipeline.make_data_iterator")["pack"] is False
  evaluate = gin.get_bindings("medllama_jax.eval.evaluator.evaluate")
  assert evaluate["max_new_tokens"] == (16 if demo_recipe else 256)
  name = seqio_tasks.supervised.register_supervised_mixture(data_dir=data,
                                                            vocabulary_path=str(root / "model"))
  mixture = seqio.get_mixture_or_task(name)
  assert sorted(t.name for t in mixture.tasks) == sorted(
      seqio_tasks.supervised.task_name(d) for d in seqio_tasks.supervised.SUPERVISED_DATASETS)
  if demo_recipe:
    # The demo's tuning checkpoints before its end, so a killed run resumes rather than restarts.
    steps = math.ceil(run["epochs"] * seqio_tasks.supervised.train_examples(name)
                      / run["global_batch_size"])
    assert gin.get_bindings("medllama_jax.train.loop.train")["save_every"] < steps
  else:
    assert cfg.dtype == "bfloat16"
    assert gin.get_bindings("medllama_jax.train.loop.train")["sequence_length"] == 4096
    assert (evaluate["stop_sequences"], evaluate["dtype"]) == ((), "bfloat16")
