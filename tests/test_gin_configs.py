"""Every gin file in gin/ parses and builds what it configures, without training or real weights."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from medllama_jax import config, partitioning  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin"
MODEL_FILES = sorted((GIN_DIR / "models").glob("*.gin"))
MESH_FILES = sorted((GIN_DIR / "mesh").glob("*.gin"))


def test_every_gin_file_is_covered():
  covered = set(MODEL_FILES) | set(MESH_FILES)
  assert covered == set(GIN_DIR.rglob("*.gin"))
  assert MODEL_FILES and MESH_FILES


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
