"""The same model on every mesh layout, and the pieces that map logical axes onto a mesh."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import helpers  # noqa: E402
from medllama_jax import loading, partitioning  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

# Sharded and unsharded runs compute the same float32 function; only reduction order differs.
MESH_RTOL = 1e-5
PARITY_RTOL = 1e-4  # Against transformers (see test_model_parity.py).

# (data, fsdp, tensor)
LAYOUTS = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
BATCH, LENGTH = 8, 16


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """8 query heads over 2 KV heads: a tensor axis of 8 cannot split the KV heads (replication fallback)."""
  hf_model = helpers.make_hf_model(seed=11, vocab_size=256, hidden_size=64, intermediate_size=160,
                                   num_attention_heads=8, num_key_value_heads=2)
  root = tmp_path_factory.mktemp("partitioning")
  hf_dir = helpers.save_hf_model(hf_model, root / "hf")
  out = str(root / "orbax")
  hf.hf_to_orbax(hf_dir, out)
  return out, hf_model


@pytest.fixture(scope="module")
def inputs():
  tokens = helpers.random_tokens(256, (BATCH, LENGTH), seed=2)
  return tokens, helpers.default_positions(tokens), np.ones_like(tokens)


@pytest.fixture(scope="module")
def reference_logits(model_dir, inputs):
  loaded = loading.load_model(model_dir[0], helpers.one_device_mesh(), with_tokenizer=False)
  return helpers.forward(loaded, *inputs)


def _mesh(layout):
  if layout == (1, 1, 1):
    return helpers.one_device_mesh()
  return partitioning.make_mesh(*layout)


def test_reference_matches_transformers(model_dir, inputs, reference_logits):
  assert helpers.rel_err(reference_logits, helpers.hf_logits(model_dir[1], inputs[0])) <= PARITY_RTOL


@pytest.mark.parametrize("layout,scan_layers", [(layout, True) for layout in LAYOUTS]
                         + [((2, 2, 2), False)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("scan" if v else "unrolled"))
def test_same_logits_on_every_mesh(model_dir, inputs, reference_logits, layout, scan_layers):
  mesh = _mesh(layout)
  assert dict(mesh.shape) == dict(zip(partitioning.MESH_AXES, layout))
  loaded = loading.load_model(model_dir[0], mesh, with_tokenizer=False, scan_layers=scan_layers)
  shardings = jax.tree.map(lambda x: x.sharding, loaded.params)
  assert jax.tree.leaves(shardings) == jax.tree.leaves(
      partitioning.logical_shardings(partitioning.abstract_params(loaded.model), mesh, loaded.rules))
  run = partitioning.make_forward(loaded.model, mesh, loaded.rules, shardings, inputs[0].shape)
  logits = run(loaded.params, *inputs)
  assert logits.sharding.mesh.shape == mesh.shape
  assert helpers.rel_err(np.asarray(logits), reference_logits) <= MESH_RTOL


def _local_shape(array):
  return array.addressable_shards[0].data.shape


def test_tensor_axis_shards_heads_and_replicates_kv_heads(model_dir):
  loaded = loading.load_model(model_dir[0], _mesh((1, 1, 8)), with_tokenizer=False)
  attn = loaded.params["layers"]["self_attn"]
  q, k = attn["q_proj"], attn["k_proj"]  # [layers, embed, heads, head_dim]
  assert q.sharding.spec[2] == "tensor"
  assert q.shape == (2, 64, 8, 8) and _local_shape(q) == (2, 64, 1, 8)
  # 2 KV heads on an 8-way tensor axis: replicated rather than failing.
  assert k.sharding.spec[2] is None
  assert _local_shape(k) == k.shape
  assert attn["o_proj"].sharding.spec[1] == "tensor"  # [layers, heads, head_dim, embed]
  assert _local_shape(loaded.params["layers"]["mlp"]["gate_proj"]) == (2, 64, 20)
  assert _local_shape(loaded.params["lm_head"]) == (64, 32)
  assert _local_shape(loaded.params["embed_tokens"]) == (32, 64)


def test_fsdp_axis_shards_embed(model_dir):
  loaded = loading.load_model(model_dir[0], _mesh((1, 8, 1)), with_tokenizer=False)
  embed = loaded.params["embed_tokens"]  # [vocab, embed]
  assert embed.sharding.spec[1] == "fsdp"
  assert _local_shape(embed) == (256, 8)
  q = loaded.params["layers"]["self_attn"]["q_proj"]
  assert q.sharding.spec[1] == "fsdp" and _local_shape(q) == (2, 8, 8, 8)
  # Norm scales are never sharded.
  assert _local_shape(loaded.params["norm"]["scale"]) == (64,)


def test_data_axis_replicates_params(model_dir):
  loaded = loading.load_model(model_dir[0], _mesh((8, 1, 1)), with_tokenizer=False)
  for leaf in jax.tree.leaves(loaded.params):
    assert "data" not in jax.tree.leaves(tuple(leaf.sharding.spec))
    assert _local_shape(leaf) == leaf.shape


def test_mixed_mesh_shards_both_ways(model_dir):
  loaded = loading.load_model(model_dir[0], _mesh((1, 2, 4)), with_tokenizer=False)
  q = loaded.params["layers"]["self_attn"]["q_proj"]
  assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
  assert _local_shape(q) == (2, 32, 2, 8)
  k = loaded.params["layers"]["self_attn"]["k_proj"]  # 2 KV heads: 4-way tensor axis does not divide.
  assert _local_shape(k) == (2, 32, 2, 8)


# ---- Unit tests ----


@pytest.mark.parametrize("sizes,devices,expected", [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((-1, 2, 2), 8, (2, 2, 2)),
    ((2, 1, -1), 8, (2, 1, 4)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((1, 1, 1), 1, (1, 1, 1)),
    ((1, -1, 1), 1, (1, 1, 1)),
])
def test_resolve_axis_sizes(sizes, devices, expected):
  assert partitioning.resolve_axis_sizes(sizes, devices) == expected


@pytest.mark.parametrize("sizes,devices,fragments", [
    ((-1, -1, 1), 8, ["(-1, -1, 1)", "at most one axis may be -1"]),
    ((3, -1, 1), 8, ["(3, -1, 1)", "8 devices", "not divisible by 3"]),
    ((2, 2, 1), 8, ["'data': 2", "'fsdp': 2", "'tensor': 1", "use 4 devices", "8 are available"]),
    ((4, 4, 1), 8, ["'data': 4", "'fsdp': 4", "use 16 devices", "8 are available"]),
])
def test_resolve_axis_sizes_errors(sizes, devices, fragments):
  with pytest.raises(ValueError) as excinfo:
    partitioning.resolve_axis_sizes(sizes, devices)
  for fragment in fragments:
    assert fragment in str(excinfo.value)


def test_make_mesh_fills_minus_one():
  mesh = partitioning.make_mesh(data=2, fsdp=-1, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_names == partitioning.MESH_AXES
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("spec,expected", [
    ("2,2,2", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("1, 8, 1", {"data": 1, "fsdp": 8, "tensor": 1}),
    ("1,-1,4", {"data": 1, "fsdp": -1, "tensor": 4}),
    ("data=2,fsdp=-1", {"data": 2, "fsdp": -1, "tensor": 1}),
    ("tensor=8", {"data": 1, "fsdp": 1, "tensor": 8}),
    ("fsdp=4,data=2", {"data": 2, "fsdp": 4, "tensor": 1}),
])
def test_parse_mesh_spec(spec, expected):
  assert partitioning.parse_mesh_spec(spec) == expected


@pytest.mark.parametrize("spec,fragment", [
    ("2,2", "give 3 sizes"),
    ("2,2,2,2", "give 3 sizes"),
    ("model=2", "'model=2' is not AXIS=SIZE"),
    ("data=two", "'data=two' is not AXIS=SIZE"),
    ("data", "'data' is not AXIS=SIZE"),
    ("data=2,4", "'4' is not AXIS=SIZE"),
    ("data=2.5", "'data=2.5' is not AXIS=SIZE"),
])
def test_parse_mesh_spec_errors(spec, fragment):
  with pytest.raises(ValueError) as excinfo:
    partitioning.parse_mesh_spec(spec)
  assert repr(spec) in str(excinfo.value)
  assert fragment in str(excinfo.value)


def test_parsed_spec_builds_a_mesh():
  mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec("data=2,fsdp=-1"))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


RULES = partitioning.DEFAULT_RULES


def test_spec_for_shards_divisible_dimensions():
  mesh = partitioning.make_mesh(1, 2, 4)
  assert partitioning.spec_for((64, 8, 16), ("embed", "heads", "head_dim"), mesh, RULES) == \
      PartitionSpec("fsdp", "tensor", None)
  assert partitioning.spec_for((2, 64, 256), ("layers", "embed", "mlp"), mesh, RULES) == \
      PartitionSpec(None, "fsdp", "tensor")
  assert partitioning.spec_for((64,), ("norm",), mesh, RULES) == PartitionSpec(None)


def test_spec_for_replicates_non_divisible_dimensions():
  mesh = partitioning.make_mesh(1, 1, 8)
  # 2 KV heads over 8 tensor shards: that dimension falls back to replication, the others stay.
  assert partitioning.spec_for((64, 2, 8), ("embed", "kv_heads", "head_dim"), mesh, RULES) == \
      PartitionSpec("fsdp", None, None)
  assert partitioning.spec_for((64, 8, 8), ("embed", "kv_heads", "head_dim"), mesh, RULES) == \
      PartitionSpec("fsdp", "tensor", None)
  # A vocabulary of 100 does not split 8 ways either.
  assert partitioning.spec_for((100, 64), ("vocab", "embed"), mesh, RULES) == PartitionSpec(None, "fsdp")


def test_spec_for_multi_axis_batch():
  mesh = partitioning.make_mesh(2, 2, 2)
  axes = ("activation_batch", "activation_length")
  assert partitioning.spec_for((8, 16), axes, mesh, RULES) == PartitionSpec(("data", "fsdp"), None)
  # Batch 2 is not divisible by data×fsdp = 4: replicated.
  assert partitioning.spec_for((2, 16), axes, mesh, RULES) == PartitionSpec(None, None)
  assert partitioning.shard_batch_spec(mesh, RULES, (2, 16)).spec == PartitionSpec(None, None)
  assert partitioning.batch_sharding(mesh, RULES).spec == PartitionSpec(("data", "fsdp"), None)


def test_spec_for_never_uses_a_mesh_axis_twice():
  mesh = partitioning.make_mesh(1, 1, 8)
  rules = (("a", "tensor"), ("b", "tensor"))
  assert partitioning.spec_for((16, 16), ("a", "b"), mesh, rules) == PartitionSpec("tensor", None)


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 1, 8)], ids=lambda v: "x".join(map(str, v)))
def test_init_params_has_param_shardings(layout):
  mesh = partitioning.make_mesh(*layout)
  model = Llama(get_config("tiny", num_heads=8, num_kv_heads=2, vocab_size=256))
  rules = partitioning.logical_axis_rules()
  params = partitioning.init_params(model, mesh, rules, jax.random.key(0))
  expected = partitioning.param_shardings(model, mesh, rules)
  flat_params = jax.tree.leaves(params)
  flat_expected = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, NamedSharding))
  assert len(flat_params) == len(flat_expected) > 0
  for array, sharding in zip(flat_params, flat_expected):
    assert array.sharding == sharding
  assert jax.tree.structure(params) == jax.tree.structure(
      expected, is_leaf=lambda x: isinstance(x, NamedSharding))
  # Really random and really distributed.
  q = params["layers"]["self_attn"]["q_proj"]
  assert len({s.device for s in q.addressable_shards}) == 8
  assert float(np.std(np.asarray(q))) > 0


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "node0:8476", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "node0:8476", "num_processes": 2, "process_id": 1}),
    ({"JAX_COORDINATOR_ADDRESS": "node0:8476", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({partitioning.AUTO_DISTRIBUTED_ENV: "auto"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
])
def test_initialize_distributed_joins_only_when_told(monkeypatch, env, expected):
  """Explicit peers, JAX's own discovery (TPU VM slices), or nothing on one host."""
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "TPU_WORKER_HOSTNAMES", partitioning.AUTO_DISTRIBUTED_ENV):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  partitioning.initialize_distributed()
  assert calls == ([] if expected is None else [expected])


def test_initialize_distributed_refuses_an_unknown_mode(monkeypatch):
  monkeypatch.setenv(partitioning.AUTO_DISTRIBUTED_ENV, "yes")
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with pytest.raises(ValueError, match="MEDLLAMA_DISTRIBUTED='yes'"):
    partitioning.initialize_distributed()
