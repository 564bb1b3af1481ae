"""The programs a TPU slice runs, compiled here by the TPU compiler (libtpu, compile-only devices).

``.ci/run`` installs the libtpu that ``jax[tpu]`` pins for the installed jax; the suite itself stays on
the CPU platform (conftest). ``jax.experimental.topologies`` describes real slices (v5p-8: 4 chips;
v4-8: 4 chips) and the TPU compiler compiles for them: what compiles here is what the slice runs.
Checked: the sharded train step with splash attention holds the Mosaic kernels (forward and both
backward kernels) inside the shard_map, on an FSDP mesh and on a tensor-parallel mesh with grouped KV
heads; the decode path (prefill and a cached generation step) on a tensor-sharded model; and
``medllama-plan --compiler tpu`` reports the kernel it compiled.
"""

import contextlib
import io
import json

import gin
import jax
import numpy as np
import pytest

from medllama_jax import decode, partitioning
from medllama_jax.config import get_config
from medllama_jax.model import Llama
from medllama_jax.cli import plan as cli
from medllama_jax.plan import devices, planner
from medllama_jax.plan.topology import parse_target

RULES = partitioning.logical_axis_rules()
# TPU-shaped heads (128 lanes) with grouped queries: 4 query heads reading 2 KV heads.
CONFIG = get_config("tiny", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_heads=4,
                    num_kv_heads=2, head_dim=128)
SETTINGS = planner.TrainSettings(sequence_length=512, global_batch_size=8, num_microbatches=1,
                                 total_steps=10, z_loss=0.0, lora=None)
MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'


def compile_train_step(topology, mesh, attention):
  target = parse_target(topology)
  result = planner.plan_variant(CONFIG, SETTINGS, planner.Variant(mesh=mesh, attention=attention),
                                target, "tpu", devices.tpu_devices(target))
  assert result.error is None, result.error
  return result


@pytest.mark.parametrize("topology,mesh", [
    ("v5p-8", {"data": 1, "fsdp": 4, "tensor": 1}),
    ("v4-8", {"data": 1, "fsdp": 2, "tensor": 2}),
], ids=["v5p-8-fsdp4", "v4-8-fsdp2-tensor2"])
def test_train_step_with_splash_compiles_the_mosaic_kernels(topology, mesh):
  result = compile_train_step(topology, mesh, "splash")
  # Forward, dq and dkv kernels, once each in the scanned layer body.
  assert result.mosaic_kernels == 3
  assert result.compiled.peak > 0


def test_train_step_with_xla_attention_has_no_kernel():
  result = compile_train_step("v5p-8", {"data": 1, "fsdp": 4, "tensor": 1}, "xla")
  assert result.mosaic_kernels == 0


def test_decode_prefill_and_cached_step_compile_on_a_tensor_sharded_model():
  target = parse_target("v5p-8")
  mesh = partitioning.make_mesh(1, 1, 4, devices=devices.tpu_devices(target))
  model = Llama(CONFIG.replace(attention_impl="splash"))
  shardings = partitioning.param_shardings(model, mesh, RULES)
  params = partitioning.placed(partitioning.unbox(partitioning.abstract_params(model)), shardings)
  batch, prompt_len = 4, 256
  inputs = [jax.ShapeDtypeStruct((batch, prompt_len), np.int32,
                                 sharding=partitioning.shard_batch_spec(mesh, RULES,
                                                                        (batch, prompt_len)))] * 3
  eos = jax.ShapeDtypeStruct((8,), np.int32)
  seed = jax.eval_shape(lambda: jax.random.key(0))
  rules = decode._rules_for(mesh, RULES)
  with partitioning.activate(mesh, rules):
    lowered = decode._generate_jit.lower(
        params, *inputs, eos, seed, model=model,
        sampling=decode.SamplingConfig(max_new_tokens=2), mesh=mesh, rules=rules)
    compiled = lowered.compile()
  text = compiled.as_text()
  # The prefill's splash kernel (forward only); the cached step runs the XLA path in the loop.
  assert text.count(MOSAIC_CALL) == 1
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_plan_with_the_tpu_compiler_reports_the_kernel(tmp_path, clean_gin):
  train = "medllama_jax.train.loop.train"
  bindings = [f"{train}.sequence_length = 512", f"{train}.global_batch_size = 8",
              f"{train}.num_microbatches = 1", f"{train}.total_steps = 10",
              "medllama_jax.config.model_config.overrides = {'vocab_size': 1024, "
              "'hidden_size': 512, 'intermediate_size': 1024, 'num_heads': 4, 'num_kv_heads': 2, "
              "'head_dim': 128}"]
  out = tmp_path / "plan.json"
  argv = ["--gin_file=models/tiny.gin", *(f"--gin_bindings={b}" for b in bindings),
          "--topology", "v5p-8", "--mesh", "data=1,fsdp=-1,tensor=1", "--attention", "splash",
          "--attention", "xla", "--compiler", "tpu", "--json", str(out)]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(argv) == 0
  splash, xla = json.loads(out.read_text())["results"]
  assert (splash["attention"], splash["compiler"], splash["mosaic_kernels"]) == ("splash", "tpu", 3)
  assert (xla["attention"], xla["mosaic_kernels"]) == ("xla", 0)
  row = next(line for line in printed.getvalue().splitlines()
             if line.startswith("| attention (as compiled) |"))
  assert "splash: 3 Mosaic kernel calls in the program" in row and "| xla |" in row
