"""The fused attention kernels run per shard of the training mesh and compute the XLA path's function.

Splash runs through the Pallas interpreter here (the same kernel code Mosaic compiles for TPU; the TPU
compile itself is tests/test_tpu_compile.py), inside ``shard_map`` over 8 simulated devices
(data=2 x fsdp=2 x tensor=2), on packed rows with a padded tail. The reference is the same model with
``attention_impl="xla"`` on the same mesh: logits and every parameter gradient must agree to float32
rounding. Each case also checks, from the traced program, that the kernel really ran inside a
``shard_map`` (a silent fallback to the XLA path would otherwise pass).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import helpers  # noqa: E402
from medllama_jax import attention, decode, partitioning  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

RULES = partitioning.logical_axis_rules()
# Interpreted splash and the XLA einsums accumulate in different orders: observed ~5e-7 relative.
KERNEL_RTOL = 1e-5
LENGTH = 128  # splash tiles sequences in multiples of 128

# (query heads, KV heads) against a 2-way tensor axis: KV heads split with their query heads; one KV
# head for all (replicated, each shard slices its own); 3 KV heads (replicated, each shard gathers).
HEAD_LAYOUTS = {"kv-sharded": (4, 2), "gqa-kv-replicated": (4, 1), "gqa-kv-gathered": (6, 3)}


def packed_batch(vocab_size: int, batch: int = 4):
  """Rows of one document, of three packed documents with a padded tail, and of two documents."""
  tokens = helpers.random_tokens(vocab_size, (batch, LENGTH), seed=11)
  segment_ids = np.ones((batch, LENGTH), np.int32)
  positions = helpers.default_positions(tokens)
  for row, lengths in ((1, (50, 30, 40)), (3, (77, 51)))[:batch // 2]:
    segment_ids[row] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                                      + [np.zeros(LENGTH - sum(lengths))])
    positions[row] = np.concatenate([np.arange(n) for n in lengths]
                                    + [np.arange(LENGTH - sum(lengths))])
  return tokens, positions, segment_ids


def config_for(layout: str, impl: str):
  heads, kv_heads = HEAD_LAYOUTS[layout]
  return get_config("tiny", hidden_size=16 * heads, num_heads=heads, num_kv_heads=kv_heads,
                    attention_impl=impl)


def loss_and_grads(config, params, mesh, batch):
  model = Llama(config)

  def loss(p):
    with nn.logical_axis_rules(RULES):
      logits, _ = model.apply({"params": p}, *batch)
    return jnp.mean(jnp.square(logits)), logits

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  with partitioning.activate(mesh, RULES):
    jaxpr = str(jax.make_jaxpr(step)(params))
    (_, logits), grads = step(params)
  return np.asarray(logits), helpers.host_params(grads), jaxpr


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh(2, 2, 2)


@pytest.mark.parametrize("layout", sorted(HEAD_LAYOUTS))
def test_sharded_splash_equals_xla_forward_and_gradients(mesh, layout):
  xla_config, splash_config = config_for(layout, "xla"), config_for(layout, "splash")
  params = partitioning.init_params(Llama(xla_config), mesh, RULES, jax.random.key(3))
  batch = packed_batch(xla_config.vocab_size)
  ref_logits, ref_grads, ref_jaxpr = loss_and_grads(xla_config, params, mesh, batch)
  logits, grads, jaxpr = loss_and_grads(splash_config, params, mesh, batch)

  assert "pallas_call" not in ref_jaxpr
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  assert helpers.rel_err(logits, ref_logits) <= KERNEL_RTOL
  assert all(np.any(g != 0) for g in ref_grads.values())
  for path, expected in ref_grads.items():
    assert helpers.rel_err(grads[path], expected) <= KERNEL_RTOL, path


def test_splash_without_a_mesh_equals_xla():
  """One device, no mesh active: the kernel runs on the whole arrays, no shard_map."""
  config = config_for("gqa-kv-replicated", "xla")
  params = Llama(config).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
  batch = packed_batch(config.vocab_size, batch=2)
  ref, _ = Llama(config).apply({"params": params}, *batch)
  splash = Llama(config.replace(attention_impl="splash"))
  jaxpr = str(jax.make_jaxpr(lambda p: splash.apply({"params": p}, *batch))(params))
  logits, _ = splash.apply({"params": params}, *batch)
  assert "pallas_call" in jaxpr and "shard_map" not in jaxpr
  assert helpers.rel_err(logits, ref) <= KERNEL_RTOL


def test_decode_prefill_runs_splash_and_generates_the_xla_ids(mesh):
  """Greedy generation on a tensor-sharded model: the prefill (prompts padded to 128) goes through
  the sharded kernel, the cached steps through the XLA path, and the ids are the XLA path's."""
  config = config_for("gqa-kv-replicated", "xla")
  tensor_mesh = partitioning.make_mesh(1, 1, 2, devices=jax.devices()[:2])
  params = partitioning.init_params(Llama(config), tensor_mesh, RULES, jax.random.key(5))
  prompts = [list(range(3, 40)), list(range(7, 100)), list(range(11, 30))]
  sampling = decode.SamplingConfig(max_new_tokens=6)
  ids = {}
  for impl in ("xla", "splash"):
    ids[impl] = decode.generate(Llama(config.replace(attention_impl=impl)), params, prompts,
                                sampling, eos_ids=[], mesh=tensor_mesh, bucket=LENGTH)
  assert ids["splash"] == ids["xla"]
  assert all(len(row) == 6 for row in ids["xla"])

  tokens, segment_ids, positions = decode.left_pad(prompts, bucket=LENGTH)
  splash = Llama(config.replace(attention_impl="splash"))
  with partitioning.activate(tensor_mesh, RULES):
    jaxpr = str(jax.make_jaxpr(
        lambda p: decode._generate_jit(p, tokens, positions, segment_ids, np.zeros(8, np.int32),
                                       jax.random.key(0), model=splash, sampling=sampling,
                                       mesh=tensor_mesh, rules=decode._rules_for(tensor_mesh, RULES))
    )(params))
  assert jaxpr.count("pallas_call") >= 1 and "shard_map" in jaxpr


@pytest.mark.parametrize("impl,platform,length,dtype,reason", [
    ("splash", "cpu", 200, jnp.float32, "cannot tile sequence length 200"),
    ("splash", "gpu", 128, jnp.bfloat16, "TPU kernel"),
    ("cudnn", "tpu", 128, jnp.bfloat16, "needs a GPU"),
    ("cudnn", "cpu", 128, jnp.bfloat16, "needs a GPU"),
    ("cudnn", "gpu", 128, jnp.float32, "bfloat16/float16"),
])
def test_kernel_fallbacks_say_why(impl, platform, length, dtype, reason):
  q = jnp.zeros((1, length, 4, 16), dtype)
  kernel, why_not = attention.kernel_for(impl, q, q, 0, platform)
  assert kernel is None and reason in why_not


@pytest.mark.parametrize("impl,platform,interpreted", [("splash", "tpu", False),
                                                       ("splash", "cpu", True)])
def test_splash_is_compiled_for_tpu_and_interpreted_elsewhere(impl, platform, interpreted):
  q = jnp.zeros((1, LENGTH, 4, 16), jnp.float32)
  kernel, why_not = attention.kernel_for(impl, q, q, 0, platform)
  assert why_not is None and kernel.keywords == {"interpret": interpreted}


def test_cudnn_is_chosen_on_gpu_for_bfloat16():
  q = jnp.zeros((1, LENGTH, 4, 128), jnp.bfloat16)
  assert attention.kernel_for("cudnn", q, q, 0, "gpu") == (attention.cudnn_attention, None)


def test_a_cache_step_or_a_short_sequence_runs_the_xla_path_silently():
  q, cache = jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, LENGTH, 2, 16))
  assert attention.kernel_for("splash", q, cache, jnp.int32(5), "tpu") == (None, None)
  assert attention.kernel_for("splash", q, q, 0, "tpu") == (None, None)


def test_compile_platform_follows_the_active_mesh(mesh):
  assert partitioning.compile_platform() == jax.devices()[0].platform
  with partitioning.activate(mesh, RULES):
    assert partitioning.compile_platform() == "cpu"
    assert partitioning.activation_spec((8, LENGTH, 4, 16), ("activation_batch", None,
                                                             "activation_heads", None)) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)


@pytest.mark.parametrize("length,blocks", [(512, 4), (1024, 8), (256, 2)])
def test_blocked_causal_attention_equals_the_full_score_matrix(length, blocks):
  """The XLA path skips the causally masked upper blocks; values and gradients are unchanged."""
  assert attention.causal_blocks(length) == blocks
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, length, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32) for _ in range(2))
  segment_ids = np.ones((2, length), np.int32)
  segment_ids[1, length // 3:] = 2
  segment_ids[1, -40:] = 0
  mask = attention.attention_mask(jnp.asarray(segment_ids), jnp.asarray(segment_ids))

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  full = loss(lambda q, k, v: attention.xla_attention(q, k, v, mask))
  blocked = loss(lambda q, k, v: attention.blocked_causal_attention(q, k, v, mask, blocks))
  np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), rtol=KERNEL_RTOL)
  for got, want in zip(jax.grad(blocked, argnums=(0, 1, 2))(q, k, v),
                       jax.grad(full, argnums=(0, 1, 2))(q, k, v)):
    assert helpers.rel_err(got, want) <= KERNEL_RTOL


def test_short_or_untileable_sequences_are_not_blocked():
  assert attention.causal_blocks(128) == 1 and attention.causal_blocks(200) == 1


def test_cudnn_is_asked_for_the_xla_paths_function():
  """cuDNN needs a GPU, so its kernel cannot run here; what it is asked to compute can: causal
  attention plus the segment bias, through jax's reference implementation of the same call."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, LENGTH, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, LENGTH, 2, 16)), jnp.float32) for _ in range(2))
  _, _, segment_ids = packed_batch(64, batch=2)
  segment_ids = jnp.asarray(segment_ids)
  expected = attention.xla_attention(q, k, v, attention.attention_mask(segment_ids, segment_ids))
  asked = jax.nn.dot_product_attention(
      q, k, v, bias=attention.segment_bias(segment_ids, segment_ids, q.dtype), is_causal=True,
      implementation="xla")
  assert helpers.rel_err(asked, expected) <= KERNEL_RTOL
