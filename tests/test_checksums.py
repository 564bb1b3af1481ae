"""Checksums of parameter checkpoints and run checkpoints, and one-line checkpoint errors.

Damaged bytes in Orbax's data files can decode into other numbers without any error: the tests flip
bytes where they still decode (``flip_decodable``) and expect the load to name the tensor and file.
Missing or truncated files, and a file system that refuses a save (a file size limit in a child
process standing in for a full disk), must each be said in one line.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medllama_jax import checkpointing, loading, partitioning
from medllama_jax.config import get_config
from medllama_jax.model import Llama
from medllama_jax.train import checkpoints
from medllama_jax.train.step import TrainState

CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
  return partitioning.make_mesh(2, 2, 2)


def random_params(config, mesh) -> dict:
  """The model's parameters drawn on the host and placed on their shardings (no compiled init)."""
  boxed = partitioning.abstract_params(Llama(config))
  shardings = partitioning.logical_shardings(boxed, mesh, partitioning.logical_axis_rules())
  rng = np.random.RandomState(3)
  return jax.tree.map(
      lambda spec, sharding: jax.device_put(
          (rng.randn(*spec.shape) * 0.1).astype(spec.dtype), sharding),
      partitioning.unbox(boxed), shardings)


def copy_of(pristine: Path, tmp_path: Path) -> str:
  return str(shutil.copytree(pristine, tmp_path / pristine.name))


def data_files(directory: str | Path) -> list[str]:
  """Orbax's data files under ``directory``, largest first."""
  files = glob.glob(os.path.join(os.fspath(directory), "**", "ocdbt.process_*", "d", "*"),
                    recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def flip_decodable(directory: str | Path, reads_back: Callable[[], bool],
                   path: str | None = None) -> str:
  """Flips 64 bytes of ``path`` (default: the largest data file) at the first offset where
  ``reads_back`` (a read without verification) still succeeds; returns the file. Damage that fails
  to decompress is Orbax's own error, not what checksums are for."""
  path = path or data_files(directory)[0]
  original = Path(path).read_bytes()
  for fraction in (0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8):
    damaged = bytearray(original)
    start = int(len(damaged) * fraction)
    damaged[start:start + 64] = bytes(b ^ 0x5A for b in damaged[start:start + 64])
    Path(path).write_bytes(bytes(damaged))
    try:
      if reads_back():
        return path
    except checkpointing.CheckpointUnreadable:
      pass
  raise AssertionError(f"{path}: no flip of 64 bytes decodes")


def assert_one_line(message: str, *fragments: str) -> None:
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


def same_tree(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- The checksum ----


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8", "int32", "bool"])
@pytest.mark.parametrize("spec", [(), ("data", "fsdp"), ("tensor", None)])
def test_device_checksums_equal_numpy_ones_on_any_sharding(mesh, dtype, spec):
  values = (np.random.RandomState(0).randn(8, 12) * 40).astype(jnp.dtype(dtype))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  array = jax.device_put(values, sharding)
  assert checkpointing.tensor_checksums({"x": array})["x"] == checkpointing.host_checksum(values)


def test_host_checksum_spans_chunks_and_sees_moved_elements():
  """More elements than numpy hashes at a time; any moved or changed element shows."""
  values = np.random.RandomState(1).randn(3, 50_000).astype(np.float32)
  device = checkpointing.tensor_checksums({"x": jnp.asarray(values)})["x"]
  assert device == checkpointing.host_checksum(values)
  swapped = values.copy()
  swapped[0, 0], swapped[2, -1] = values[2, -1], values[0, 0]
  changed = values.copy()
  changed[1, 7] = np.nextafter(changed[1, 7], np.float32(np.inf))
  sums = {checkpointing.host_checksum(v).checksum for v in (values, swapped, changed)}
  assert len(sums) == 3


# ---- Model folders ----


@pytest.fixture(scope="module")
def pristine_model(tmp_path_factory, mesh) -> Path:
  directory = tmp_path_factory.mktemp("pristine") / "model"
  loading.save_model(str(directory), random_params(CONFIG, mesh), CONFIG, None)
  return directory


@pytest.fixture
def model_dir(pristine_model, tmp_path) -> str:
  """A model folder of the tiny model in the stacked layout, written by ``save_model``."""
  return copy_of(pristine_model, tmp_path)


def load(model_dir: str, mesh, **kwargs):
  return loading.load_model(model_dir, mesh, with_tokenizer=False, **kwargs)


def test_model_folder_records_checksums_beside_its_tensors(model_dir, mesh):
  params_dir = os.path.join(model_dir, checkpointing.PARAMS_DIR)
  record = json.loads(Path(params_dir, checkpointing.CHECKSUMS_FILE).read_text())
  stored = checkpointing.params_metadata(params_dir)
  assert set(record["tensors"]) == {"/".join(p) for p in stored}
  loaded = load(model_dir, mesh)
  assert checkpointing.tensor_checksums(loaded.params) == checkpointing.read_checksums(params_dir)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_flipped_bytes_fail_the_load_naming_tensor_and_file(model_dir, mesh, scan_layers):
  """Stored stacked; read stacked, or sliced into per-layer tensors after the check."""
  original = load(model_dir, mesh, scan_layers=scan_layers).params
  damaged = flip_decodable(model_dir, lambda: not same_tree(
      load(model_dir, mesh, scan_layers=scan_layers, verify_checksums=False).params, original))
  with pytest.raises(checkpointing.CheckpointCorrupted) as error:
    load(model_dir, mesh, scan_layers=scan_layers)
  params_dir = os.path.join(model_dir, checkpointing.PARAMS_DIR)
  assert_one_line(str(error.value), params_dir, "tensor layers/", "is corrupted",
                  os.path.relpath(damaged, params_dir))


def test_converted_folder_checks_every_layer_before_stacking(tmp_path, mesh):
  """A converter's per-layer folder (host checksums) read into the stacked layout."""
  per_layer = CONFIG.replace(scan_layers=False)
  tensors = {p: np.asarray(v)
             for p, v in checkpointing.flatten(random_params(per_layer, mesh)).items()}
  params_dir = str(tmp_path / "model" / checkpointing.PARAMS_DIR)
  checkpointing.save_params_streaming(params_dir, iter(tensors.items()))
  per_layer.save_hf_json(str(tmp_path / "model"))
  device = checkpointing.tensor_checksums({"/".join(p): jnp.asarray(v) for p, v in tensors.items()})
  assert checkpointing.read_checksums(params_dir) == device
  model_dir = str(tmp_path / "model")
  original = load(model_dir, mesh, scan_layers=True).params
  [layer_file] = checkpointing.data_files(params_dir, ["layers_1/mlp/up_proj"])
  flip_decodable(model_dir, lambda: not same_tree(
      load(model_dir, mesh, scan_layers=True, verify_checksums=False).params, original),
      os.path.join(params_dir, layer_file))
  with pytest.raises(checkpointing.CheckpointCorrupted) as error:
    load(model_dir, mesh, scan_layers=True)
  assert_one_line(str(error.value), "tensor layers_1/mlp/up_proj is corrupted", layer_file)


def test_checks_apply_to_the_stored_dtype(model_dir, mesh):
  """Read as bfloat16 from float32: checked in float32, then cast like Orbax would have."""
  direct = load(model_dir, mesh, param_dtype="bfloat16", verify_checksums=False).params
  checked = load(model_dir, mesh, param_dtype="bfloat16").params
  assert jax.tree.leaves(checked)[0].dtype == jnp.bfloat16
  assert same_tree(checked, direct)


def test_export_reads_are_checked(model_dir):
  params_dir = os.path.join(model_dir, checkpointing.PARAMS_DIR)
  stored = checkpointing.params_metadata(params_dir)
  original = checkpointing.read_tensors(params_dir, stored, stored)
  flip_decodable(model_dir, lambda: not same_tree(
      checkpointing.read_tensors(params_dir, stored, stored, verify_checksums=False), original))
  with pytest.raises(checkpointing.CheckpointCorrupted, match="is corrupted"):
    checkpointing.read_tensors(params_dir, stored, stored)


def test_folder_without_checksums_loads_with_a_warning(model_dir, mesh, caplog):
  os.remove(os.path.join(model_dir, checkpointing.PARAMS_DIR, checkpointing.CHECKSUMS_FILE))
  assert load(model_dir, mesh).params
  warnings = [r.getMessage() for r in caplog.records if "not verified" in r.getMessage()]
  assert len(warnings) == 1 and model_dir in warnings[0]


# Loads each damaged model folder on a 2 × 2 × 2 mesh (many concurrent reads fail) and writes the
# messages to stderr, as the command-line tools do.
LOAD_DAMAGED = textwrap.dedent("""
    import sys
    from medllama_jax import checkpointing, loading, partitioning
    mesh = partitioning.make_mesh(2, 2, 2)
    for model_dir in sys.argv[1:]:
      try:
        loading.load_model(model_dir, mesh, with_tokenizer=False)
      except checkpointing.CheckpointUnreadable as e:
        print(e, file=sys.stderr)
""")


def test_missing_or_truncated_data_file_is_one_line(pristine_model, tmp_path):
  """Nothing else reaches stderr: not the other reads' errors, not their leftovers at exit."""
  deleted, truncated = (copy_of(pristine_model, tmp_path / name) for name in ("deleted", "cut"))
  removed, cut = data_files(deleted)[0], data_files(truncated)[0]
  os.remove(removed)
  os.truncate(cut, os.path.getsize(cut) // 2)
  child = subprocess.run([sys.executable, "-c", LOAD_DAMAGED, deleted, truncated],
                         capture_output=True, text=True, timeout=240, env=dict(
                             os.environ, JAX_PLATFORMS="cpu",
                             XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert child.returncode == 0, child.stderr
  lines = child.stderr.splitlines()
  assert len(lines) == 2, child.stderr
  for line, model_dir, path in ((lines[0], deleted, removed), (lines[1], truncated, cut)):
    params_dir = os.path.join(model_dir, checkpointing.PARAMS_DIR)
    assert_one_line(line, params_dir + ": tensor ", "cannot be read",
                    os.path.relpath(path, params_dir))
  assert "(missing)" in lines[0]


# ---- Run checkpoints ----


class Position:
  """A stand-in input pipeline: one file holding a number."""

  def __init__(self, value: int = 0):
    self.value = value

  def save(self, directory: str) -> None:
    Path(directory, "position").write_text(str(self.value))

  def restore(self, directory: str) -> None:
    self.value = int(Path(directory, "position").read_text())


def train_state(mesh) -> TrainState:
  params = random_params(CONFIG, mesh)
  return TrainState(step=jnp.array(7, jnp.int32), params=params,
                    opt_state=optax.adamw(1e-3).init(params))


def abstract(state, dtype=None):
  def spec(x):
    floating = dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
    return jax.ShapeDtypeStruct(x.shape, dtype if floating else x.dtype, sharding=x.sharding)
  return jax.tree.map(spec, state)


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, mesh) -> tuple[Path, TrainState]:
  directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
  state = train_state(mesh)
  ckpts = checkpoints.RunCheckpoints(str(directory), save_every=7)
  assert ckpts.save(7, state, Position(5), {"tokens": 11})
  ckpts.close()
  return directory, state


@pytest.fixture
def run_checkpoint(pristine_run, tmp_path):
  """The run checkpoints (of step 7 alone) and the state it holds."""
  directory, state = pristine_run
  return checkpoints.RunCheckpoints(copy_of(directory, tmp_path), save_every=7), state


def test_run_checkpoint_restores_checked(run_checkpoint):
  """The meta item records every tensor of the state; restores check them and return the rest."""
  ckpts, state = run_checkpoint
  record = json.loads(Path(ckpts.step_dir(7), "meta", "metadata").read_text())
  names = {checkpointing.tensor_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert set(record["checksums"]["tensors"]) == names and "opt_state/0/mu/embed_tokens" in names
  position = Position()
  restored, meta = ckpts.restore(7, abstract(state), position)
  assert same_tree(restored, state) and position.value == 5
  assert meta == {"step": 7, "tokens": 11}
  as_bf16, _ = ckpts.restore(7, abstract(state, jnp.bfloat16), Position())
  assert as_bf16.params["embed_tokens"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(as_bf16.params["embed_tokens"]),
                                np.asarray(state.params["embed_tokens"].astype(jnp.bfloat16)))


def test_run_checkpoint_with_flipped_bytes_fails_to_restore(run_checkpoint):
  ckpts, state = run_checkpoint
  state_dir = os.path.join(ckpts.step_dir(7), "state")
  flip_decodable(state_dir, lambda: not same_tree(
      ckpts.restore(7, abstract(state), Position(), verify_checksums=False)[0], state))
  with pytest.raises(checkpointing.CheckpointCorrupted) as error:
    ckpts.restore(7, abstract(state), Position())
  assert_one_line(str(error.value), state_dir, "is corrupted", "ocdbt.process_0/d/")


def test_run_checkpoint_missing_data_file_is_one_line(run_checkpoint):
  ckpts, state = run_checkpoint
  state_dir = os.path.join(ckpts.step_dir(7), "state")
  os.remove(data_files(state_dir)[0])
  with pytest.raises(checkpointing.CheckpointUnreadable) as error:
    ckpts.restore(7, abstract(state), Position())
  assert_one_line(str(error.value), state_dir, "cannot be read", "(missing)")


# A child process whose files may not grow past a limit (with SIGXFSZ ignored, a write past it
# fails with EFBIG, as on a full disk): step 2 saves, the limit drops, step 4's background write
# fails, and the calls to ``save`` of the steps after it (not due) must report it.
DISK_FULL = textwrap.dedent("""
    import os, resource, signal, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from medllama_jax import checkpointing
    from medllama_jax.train import checkpoints

    class Position:
      def save(self, directory):
        open(os.path.join(directory, "position"), "w").write("0")

    state = {"w": jnp.asarray(np.random.RandomState(0).randn(128, 256), jnp.float32)}
    ckpts = checkpoints.RunCheckpoints(sys.argv[1], save_every=2)
    ckpts.save(2, state, Position(), {})
    ckpts.close()
    ckpts = checkpoints.RunCheckpoints(sys.argv[1], save_every=2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
    assert ckpts.save(4, state, Position(), {})
    deadline = time.time() + 60
    try:
      while time.time() < deadline:
        assert not ckpts.save(5, state, Position(), {})
        time.sleep(0.05)
      print("NO ERROR")
    except checkpointing.CheckpointWriteFailed as e:
      print("RUN:", e)
    try:
      checkpointing.save_params(sys.argv[2], state)
      print("NO ERROR")
    except checkpointing.CheckpointWriteFailed as e:
      print("FOLDER:", e)
""")


def test_full_disk_is_reported_at_the_next_step_in_one_line(tmp_path):
  directory = str(tmp_path / "checkpoints")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  child = subprocess.run([sys.executable, "-c", DISK_FULL, directory, str(tmp_path / "params")],
                         capture_output=True, text=True, env=env, timeout=240)
  lines = dict(line.split(": ", 1) for line in child.stdout.splitlines() if ": " in line)
  assert child.returncode == 0 and "NO ERROR" not in child.stdout, (child.stdout, child.stderr)
  assert_one_line(lines["RUN"], os.path.join(directory, "4"), "File too large (errno 27)",
                  "step 2, stays the resume point")
  assert_one_line(lines["FOLDER"], str(tmp_path / "params"), "File too large (errno 27)")
  assert "Traceback" not in child.stderr  # Orbax's threads report it in one line each.
  ckpts = checkpoints.RunCheckpoints(directory, save_every=2)
  assert ckpts.latest_step() == 2
  state = {"w": jnp.asarray(np.random.RandomState(0).randn(128, 256), jnp.float32)}
  restored, _ = ckpts.restore(2, abstract(state), Position())
  assert same_tree(restored, state)


def test_commands_refuse_a_corrupted_folder_in_one_line_unless_told_to_skip(model_dir, tmp_path,
                                                                             capsys):
  from medllama_jax.cli import convert

  params_dir = os.path.join(model_dir, checkpointing.PARAMS_DIR)
  stored = checkpointing.params_metadata(params_dir)
  original = checkpointing.read_tensors(params_dir, stored, stored)
  flip_decodable(model_dir, lambda: not same_tree(
      checkpointing.read_tensors(params_dir, stored, stored, verify_checksums=False), original))
  export = ["orbax-to-hf", "--ckpt", model_dir, "--out"]
  assert convert.main([*export, str(tmp_path / "refused")]) == 1
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("medllama-convert: error: ") and "is corrupted" in line
  assert not (tmp_path / "refused").exists()
  assert convert.main([*export, str(tmp_path / "exported"), "--skip_checksums"]) == 0
