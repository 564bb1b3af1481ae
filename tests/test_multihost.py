"""Multi-process training on one machine, and run checkpoints restored on other meshes.

Two ``medllama-train`` processes with 2 virtual CPU devices each join one JAX runtime through a
localhost coordinator (``partitioning.initialize_distributed``, CPU collectives over gloo) and train
the tiny LLaMA on a data × fsdp = 2 × 2 mesh: each process reads its own data shard, both write the
checkpoints. The reference is one process on 4 devices reading both shards: the same global batches,
so the same losses and parameters, up to the order of the cross-process reductions (relative 1e-5;
measured: about 1e-7). The step-2 checkpoint of the two processes then resumes in one process on a
2-device tensor-parallel mesh, and the final model folder loads on one device.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
import test_train_loop
from medllama_jax import loading, partitioning
from medllama_jax.config import get_config
from medllama_jax.data import pipeline
from medllama_jax.demo import complete_checkpoints
from medllama_jax.model import Llama
from medllama_jax.train import checkpoints, optimizer as optim, step as train_step
from seqio_tasks.pretrain import register_pretrain_mixture
from test_train_loop import final_params, gin_flags, losses_by_step

workspace = test_train_loop.workspace  # the trainer tests' tokenizer and prepared corpus (a fixture)

TOTAL_STEPS = 4
SAVE_EVERY = 2
GLOBAL_BATCH = 8
LENGTH = 32
RTOL = 1e-5  # cross-process all-reduces may sum in another order than one process does
TIMEOUT_S = 900
# One process reading the two data shards that two processes read by default.
NUM_SHARDS_2 = "--gin.medllama_jax.data.pipeline.make_data_iterator.num_shards=2"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def mesh_flags(data: int, fsdp: int, tensor: int) -> list[str]:
  return [f"--gin.medllama_jax.partitioning.make_mesh.{axis}={size}"
          for axis, size in (("data", data), ("fsdp", fsdp), ("tensor", tensor))]


def launch(ws, run_dir: str, processes: int, devices_per_process: int, extra_flags: list[str]
           ) -> list[subprocess.Popen]:
  """``processes`` trainer processes of one run (one JAX runtime when there are several)."""
  # The CLI needs a gin file; the mesh bindings of ``extra_flags`` override its one-device mesh.
  command = [sys.executable, "-m", "medllama_jax.cli.train", "--gin_file", "mesh/single_device.gin",
             *gin_flags(ws, run_dir, total_steps=TOTAL_STEPS, save_every=SAVE_EVERY, eval_every=0,
                        global_batch_size=GLOBAL_BATCH, sequence_length=LENGTH),
             *extra_flags]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  coordinator = f"localhost:{free_port()}"
  started = []
  for index in range(processes):
    if processes > 1:
      env = {**env, "JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(processes),
             "JAX_PROCESS_ID": str(index)}
    with open(f"{run_dir}.process_{index}.log", "w") as log:
      started.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
  return started


def with_log_file(console_text: str) -> str:
  """A process's console, then the log file it names (where the details go)."""
  named = re.search(r"log file (\S+)", console_text)
  return console_text + (open(named.group(1)).read() if named else "")


def wait(runs: dict[str, list[subprocess.Popen]]) -> dict[str, list[str]]:
  """Every process's log by run directory, once all exited 0 (after a failure the rest are stopped)."""
  processes = [p for started in runs.values() for p in started]
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = {run_dir: [with_log_file(open(f"{run_dir}.process_{i}.log").read())
                    for i in range(len(started))]
          for run_dir, started in runs.items()}
  assert codes == [0] * len(processes), "\n\n".join(
      log[-3000:] for run_logs in logs.values() for log in run_logs)
  return logs


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
  """The run of 2 processes × 2 devices and the reference run of 1 process × 4 devices, started
  together."""
  root = tmp_path_factory.mktemp("multihost")
  multi, single = str(root / "two_processes"), str(root / "one_process")
  logs = wait({
      multi: launch(workspace, multi, 2, 2, mesh_flags(2, 2, 1)),
      single: launch(workspace, single, 1, 4, mesh_flags(2, 2, 1) + [NUM_SHARDS_2]),
  })
  return {"multi": multi, "single": single, "multi_logs": logs[multi], "root": root}


def assert_params_close(actual: dict, expected: dict) -> None:
  assert actual.keys() == expected.keys()
  for name in expected:
    assert helpers.rel_err(actual[name], expected[name]) <= RTOL, "/".join(name)


def test_two_processes_train_like_one_process_over_as_many_devices(runs):
  for index, log in enumerate(runs["multi_logs"]):
    assert f"process {index} of 2, 2 local / 4 global devices" in log
    assert f"shards {index}-{index} of 2" in log
  assert complete_checkpoints(runs["multi"]) == [2, 4]
  for step in (2, 4):  # both processes' data positions, in the checkpoint both wrote
    data = os.path.join(runs["multi"], "checkpoints", str(step), "data")
    assert sorted(n for n in os.listdir(data) if n.startswith("shard_")) == ["shard_0-of-2",
                                                                            "shard_1-of-2"]
  multi, single = losses_by_step(runs["multi"]), losses_by_step(runs["single"])
  assert sorted(multi) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(multi)],
                             rtol=RTOL)
  assert_params_close(final_params(runs["multi"]), final_params(runs["single"]))


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(workspace, runs):
  resumed = str(runs["root"] / "resumed")
  shutil.copytree(os.path.join(runs["multi"], "checkpoints", str(SAVE_EVERY)),
                  os.path.join(resumed, "checkpoints", str(SAVE_EVERY)))
  log, = wait({resumed: launch(workspace, resumed, 1, 2, mesh_flags(1, 1, 2) + [NUM_SHARDS_2])})[
      resumed]
  assert f"resuming at step {SAVE_EVERY}" in log and "shards 0-1 of 2" in log
  uninterrupted, continued = losses_by_step(runs["multi"]), losses_by_step(resumed)
  assert sorted(continued) == list(range(SAVE_EVERY + 1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([continued[s] for s in sorted(continued)],
                             [uninterrupted[s] for s in sorted(continued)], rtol=RTOL)
  assert_params_close(final_params(resumed), final_params(runs["multi"]))


@pytest.fixture(scope="module")
def mixture(workspace):
  """The trainer's mixture, registered in this process."""
  return register_pretrain_mixture(str(workspace / "data"), str(workspace / "tokenizer"),
                                   group_rates={"general": 1})


def data_iterator(mixture: str, num_shards: int) -> pipeline.DataIterator:
  return pipeline.make_data_iterator(mixture, LENGTH, GLOBAL_BATCH, seed=0, num_shards=num_shards)


def tiny_state_target(mesh: jax.sharding.Mesh):
  """The trainer's ``TrainState`` for the tiny model as a restore target on ``mesh``, the model and
  the rules."""
  model = Llama(get_config("tiny"))
  tx, _ = optim.make_optimizer(total_steps=TOTAL_STEPS)
  rules = partitioning.logical_axis_rules()
  return partitioning.placed(
      partitioning.unbox(train_step.abstract_train_state(model, tx)),
      train_step.train_state_shardings(model, tx, mesh, rules)), model, rules


def test_data_position_of_two_shards_is_refused_by_one_shard_reader(runs, mixture):
  ckpts = checkpoints.RunCheckpoints(os.path.join(runs["multi"], "checkpoints"), SAVE_EVERY)
  target, _, _ = tiny_state_target(helpers.one_device_mesh())
  try:
    with pytest.raises(FileNotFoundError, match=r"saved for 2 data shards \(shard_0-of-2, "
                                                r"shard_1-of-2\), but this run reads 1: bind "
                                                r"make_data_iterator.num_shards = 2"):
      ckpts.restore(SAVE_EVERY, target, data_iterator(mixture, num_shards=1))
  finally:
    ckpts.close()


def test_final_model_of_two_processes_loads_on_one_device(runs, mixture):
  """The folder the two processes exported holds the trained state (bit for bit), and loaded on
  one device it gives the logits that state gives on 8 devices (2 × 2 × 2)."""
  ckpts = checkpoints.RunCheckpoints(os.path.join(runs["multi"], "checkpoints"), SAVE_EVERY)
  mesh = partitioning.make_mesh(2, 2, 2)
  target, model, rules = tiny_state_target(mesh)
  try:
    state, meta = ckpts.restore(TOTAL_STEPS, target, data_iterator(mixture, num_shards=2))
  finally:
    ckpts.close()
  assert int(state.step) == TOTAL_STEPS and meta["step"] == TOTAL_STEPS
  trained = helpers.host_params(state.params)
  helpers.assert_bit_exact(final_params(runs["multi"]), trained)

  loaded = loading.load_model(os.path.join(runs["multi"], "final_model"), helpers.one_device_mesh())
  tokens = helpers.random_tokens(model.config.vocab_size, (2, 16), seed=3)
  on_one_device = helpers.forward(loaded, tokens)
  on_eight = helpers.forward(loading.LoadedModel(model.config, model, state.params, None, mesh,
                                                 rules), tokens)
  assert helpers.rel_err(on_one_device, on_eight) <= RTOL


def test_checkpoint_of_eight_devices_restores_on_one_and_on_two(tmp_path, mixture):
  """A run checkpoint written on a 2 × 2 × 2 mesh restores on 1 device and on 2 (fsdp): the same
  state bit for bit, on the reader's shardings, and the data position."""
  target, _, _ = tiny_state_target(partitioning.make_mesh(2, 2, 2))
  rng = np.random.default_rng(7)
  state = jax.device_put(jax.tree.map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
      else np.full(x.shape, 3, x.dtype), target), jax.tree.map(lambda x: x.sharding, target))
  written = data_iterator(mixture, num_shards=1)
  next(written)
  ckpts = checkpoints.RunCheckpoints(str(tmp_path / "checkpoints"), save_every=1)
  try:
    ckpts.save(1, state, written, {"skipped_steps": 0})
  finally:
    ckpts.close()
  expected_batch = next(written)

  reader = data_iterator(mixture, num_shards=1)
  for layout in ((1, 1, 1), (1, 2, 1)):
    devices = jax.devices()[:int(np.prod(layout))]
    reader_target, _, _ = tiny_state_target(partitioning.make_mesh(*layout, devices=devices))
    ckpts = checkpoints.RunCheckpoints(str(tmp_path / "checkpoints"), save_every=1)
    try:
      restored, _ = ckpts.restore(1, reader_target, reader)
    finally:
      ckpts.close()
    for got, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(reader_target)):
      assert got.sharding == spec.sharding and set(got.sharding.device_set) == set(devices)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    restored_batch = next(reader)
    for name, want in expected_batch.items():
      np.testing.assert_array_equal(restored_batch[name], want, err_msg=f"{layout}: {name}")


def test_processes_read_consecutive_shards():
  assert [list(pipeline.process_shards(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
  assert list(pipeline.process_shards(2, 0, 1)) == [0, 1]
  with pytest.raises(ValueError, match="3 data shards cannot be split evenly over 2 processes"):
    pipeline.process_shards(3, 0, 2)
  with pytest.raises(ValueError, match=r"shard_index 2 is not in \[0, 2\)"):
    pipeline.make_data_iterator("unused", LENGTH, GLOBAL_BATCH, shard_index=2, num_shards=2)
