"""The sharded train step: equal to unsharded training, accumulation-invariant, loss-weighted, NaN-safe."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from medllama_jax import partitioning  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402
from medllama_jax.train import optimizer as optim  # noqa: E402
from medllama_jax.train import step as train_step  # noqa: E402

# float32 on CPU: sharded reductions reorder sums, so parameters agree to rounding, not bitwise.
PARAM_ATOL = 2e-5
LOSS_RTOL = 1e-5
RULES = partitioning.logical_axis_rules()
CONFIG = get_config("tiny", num_heads=4, num_kv_heads=2)


def make_batches(n, batch=8, length=16, seed=0):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    tokens = rs.randint(3, CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)
    out.append({
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": (rs.rand(batch, length) > 0.25).astype(np.float32),
        "decoder_segment_ids": np.ones((batch, length), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    })
  return out


def train(mesh_shape, batches, num_microbatches=1, peak_lr=1e-2):
  mesh = partitioning.make_mesh(*mesh_shape)
  model = Llama(CONFIG)
  opt, _ = optim.make_optimizer(total_steps=10, peak_lr=peak_lr, warmup_fraction=0.2)
  shardings = train_step.train_state_shardings(model, opt, mesh, RULES)
  params = partitioning.init_params(model, mesh, RULES, jax.random.key(0))
  state = train_step.init_train_state(params, opt, shardings)
  step = train_step.jit_train_step(train_step.make_train_step(model, opt, num_microbatches),
                                   shardings, mesh, RULES)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


@pytest.fixture(scope="module")
def reference():
  return train((1, 1, 1), make_batches(4))


@pytest.mark.parametrize("mesh_shape,micro", [((2, 2, 2), 1), ((1, 2, 4), 1), ((2, 2, 2), 2),
                                              ((1, 1, 1), 4)])
def test_sharded_and_accumulated_training_equals_reference(reference, mesh_shape, micro):
  ref_losses, ref_state = reference
  losses, state = train(mesh_shape, make_batches(4), num_microbatches=micro)
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, atol=PARAM_ATOL)
  assert int(state.step) == 4


def test_loss_is_weighted_mean_of_token_cross_entropy():
  rs = np.random.RandomState(1)
  logits = rs.randn(2, 5, 7).astype(np.float32)
  targets = rs.randint(0, 7, (2, 5))
  weights = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], np.float32)
  sums = train_step.token_losses(logits, targets, weights, z_loss=1e-4)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums["loss_sum"], (nll * weights).sum(), rtol=1e-6)
  np.testing.assert_allclose(sums["weight_sum"], weights.sum())
  log_z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(sums["z_loss_sum"], 1e-4 * (log_z**2 * weights).sum(), rtol=1e-5)


def test_zero_weight_tokens_do_not_change_gradients():
  model = Llama(CONFIG)
  params = partitioning.unbox(model.init(jax.random.key(0), np.ones((1, 1), np.int32))["params"])
  step_fn = train_step.make_train_step(model, optax.sgd(1.0))
  state = train_step.TrainState(step=np.int32(0), params=params, opt_state=optax.sgd(1.0).init(params))
  batch = make_batches(1, batch=2)[0]
  batch["decoder_loss_weights"][:, 8:] = 0
  changed = {k: v.copy() for k, v in batch.items()}
  changed["decoder_target_tokens"][:, 8:] = 5  # Targets under zero weight.
  a, _ = jax.jit(step_fn)(state, batch)
  b, _ = jax.jit(step_fn)(state, changed)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def test_non_finite_step_leaves_state_unchanged():
  model = Llama(CONFIG)
  params = partitioning.unbox(model.init(jax.random.key(0), np.ones((1, 1), np.int32))["params"])
  opt = optax.adam(1e-3)
  state = train_step.TrainState(step=np.int32(3), params=params, opt_state=opt.init(params))
  params_nan = jax.tree.map(lambda p: p, params)
  params_nan["norm"]["scale"] = params_nan["norm"]["scale"].at[0].set(np.nan)
  state_nan = state.replace(params=params_nan)
  new, metrics = jax.jit(train_step.make_train_step(model, opt))(state_nan, make_batches(1)[0])
  assert not bool(metrics["finite"])
  assert int(new.step) == 3
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(state_nan.params)):
    np.testing.assert_array_equal(x, y)


def test_overflowing_update_leaves_state_unchanged():
  """Loss and gradients finite, but a learning rate past float32's range makes the new parameters
  infinite: the step must not accept them (they would reach the next checkpoint)."""
  model = Llama(CONFIG)
  params = partitioning.unbox(model.init(jax.random.key(0), np.ones((1, 1), np.int32))["params"])
  opt = optax.sgd(1e39)
  state = train_step.TrainState(step=np.int32(3), params=params, opt_state=opt.init(params))
  new, metrics = jax.jit(train_step.make_train_step(model, opt))(state, make_batches(1)[0])
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"])
  assert int(new.step) == 3
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)


def test_schedule_warmup_then_cosine():
  schedule = optim.learning_rate_schedule(8e-6, total_steps=100, warmup_fraction=0.05)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 8e-6, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(schedule(52)), 8e-6 * 0.5 * (1 + np.cos(np.pi * 47 / 95)), rtol=1e-5)


def test_weight_decay_skips_norm_scales():
  params = partitioning.unbox(Llama(CONFIG).init(jax.random.key(0), np.ones((1, 1), np.int32))["params"])
  mask = optim.decay_mask(params)
  assert not mask["norm"]["scale"]
  assert not mask["layers"]["input_layernorm"]["scale"]
  assert mask["layers"]["self_attn"]["q_proj"] and mask["embed_tokens"]
