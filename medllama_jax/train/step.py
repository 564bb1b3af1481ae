"""The train state and the jit'd, sharded train step.

Batches use seqio's decoder feature names (``decoder_input_tokens``, ``decoder_target_tokens``,
``decoder_loss_weights``, ``decoder_segment_ids``, ``decoder_positions``), so the same step serves packed
pre-training rows (loss weight 1 on real tokens) and instruction tuning (loss weight 1 on responses only).

Gradient accumulation scans over microbatches inside one step and normalises by the loss weights of the
whole global batch, so accumulating ``k`` microbatches gives the same update as one batch ``k`` times as
large. A step whose loss, gradient or updated parameters are not finite leaves the state unchanged and
says so in its metrics; the training loop decides whether to stop or carry on.

With LoRA (``model.lora`` set) the state's parameters are the adapters alone: the frozen base is an
argument of the step, so it is in neither the gradients nor the optimizer state, and optimizer memory is
the adapters'. Adapter dropout draws its masks from ``(dropout_seed, step, microbatch)``: nothing more
to checkpoint, and a resumed run draws exactly the masks an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medllama_jax import lora, partitioning
from medllama_jax.model import Llama

Batch = dict[str, jax.Array]
BATCH_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions")


@flax.struct.dataclass
class TrainState:
  """``params`` are the trained parameters: the whole model's, or with LoRA the adapters'."""

  step: jax.Array
  params: Any
  opt_state: Any


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums over tokens: cross-entropy, z-loss, weights and correct argmax predictions."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      "loss_sum": jnp.sum((log_z - target_logits) * weights),
      "z_loss_sum": jnp.sum(z_loss * jnp.square(log_z) * weights),
      "weight_sum": jnp.sum(weights),
      "correct_sum": jnp.sum(correct * weights),
  }


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                       f"num_microbatches={num_microbatches}")
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])

  return {k: split(v) for k, v in batch.items()}


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array in ``tree`` is finite (a scalar bool)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def model_params(params: Any, frozen: Any | None) -> Any:
  """The tree the model applies: ``params`` alone, or the frozen base joined with LoRA adapters."""
  return params if frozen is None else lora.join(frozen, params)


def make_train_step(model: Llama, optimizer: optax.GradientTransformation, num_microbatches: int = 1,
                    z_loss: float = 0.0, dropout_seed: int = 0
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """``(state, batch, frozen=None) -> (state, metrics)``, to be jit'd by ``jit_train_step``.

  ``frozen`` is the base parameter tree of a LoRA model (``state.params`` being its adapters): a
  constant of the loss, never differentiated or updated.
  """
  dropout = model.lora is not None and model.lora.dropout > 0

  def loss_fn(params, frozen, micro: Batch, rng: jax.Array):
    logits, _ = model.apply({"params": model_params(params, frozen)}, micro["decoder_input_tokens"],
                            micro["decoder_positions"], micro["decoder_segment_ids"],
                            rngs={"dropout": rng} if dropout else None)
    sums = token_losses(logits, micro["decoder_target_tokens"], micro["decoder_loss_weights"], z_loss)
    return sums["loss_sum"] + sums["z_loss_sum"], sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch, frozen: Any | None = None
                 ) -> tuple[TrainState, dict]:
    micro = _split_microbatches(batch, num_microbatches)
    step_rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

    def accumulate(carry, xs):
      mb, index = xs
      grads, sums = carry
      g, s = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_rng, index))
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_sums = dict.fromkeys(("loss_sum", "z_loss_sum", "weight_sum", "correct_sum"), jnp.float32(0))
    (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums),
                                    (micro, jnp.arange(num_microbatches)))
    denominator = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = sums["loss_sum"] / denominator
    # The new parameters too: finite gradients can still make an overflowing update.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + finite.astype(state.step.dtype),
                           params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "z_loss": sums["z_loss_sum"] / denominator,
               "accuracy": sums["correct_sum"] / denominator, "tokens": sums["weight_sum"],
               "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics

  return train_step


def abstract_train_state(model: Llama, optimizer: optax.GradientTransformation) -> TrainState:
  """The train state as boxed ``ShapeDtypeStruct``s: optimizer moments inherit the params' axis names.

  For a LoRA model, the parameters (and moments) are the adapters alone.
  """

  def init():
    params = model.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    if model.lora is not None:
      params = lora.split(params)[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  return jax.eval_shape(init)


def train_state_shardings(model: Llama, optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules: partitioning.LogicalRules) -> TrainState:
  return partitioning.logical_shardings(abstract_train_state(model, optimizer), mesh, rules)


def init_train_state(params: Any, optimizer: optax.GradientTransformation,
                     shardings: TrainState) -> TrainState:
  """A fresh optimizer around ``params`` (already sharded), created directly on ``shardings``."""

  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))

  return jax.jit(init, out_shardings=shardings)(params)


def batch_shardings(mesh: Mesh, rules: partitioning.LogicalRules) -> dict[str, NamedSharding]:
  sharding = partitioning.batch_sharding(mesh, rules)
  return dict.fromkeys(BATCH_KEYS, sharding)


def sharded_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh,
                       rules: partitioning.LogicalRules, frozen_shardings: Any | None = None
                       ) -> Callable:
  """``jax.jit`` of ``(state, batch, frozen) -> (state, metrics)`` with the shardings of training.

  Shared by ``jit_train_step`` (which runs it) and the memory planner (which lowers it on abstract
  shapes), so the planner compiles exactly the program that training runs.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def step(state, batch, frozen):
    with nn.logical_axis_rules(rules):
      return step_fn(state, batch, frozen)

  return jax.jit(step,
                 in_shardings=(state_shardings, batch_shardings(mesh, rules), frozen_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh,
                   rules: partitioning.LogicalRules, frozen: Any | None = None
                   ) -> Callable[[TrainState, Batch], tuple]:
  """The train step with explicit in/out shardings; the old state's buffers are donated.

  ``frozen`` (the LoRA base, already sharded) is passed to every step as it is, never donated.
  """
  frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  jitted = sharded_train_step(step_fn, state_shardings, mesh, rules, frozen_shardings)

  def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    with partitioning.activate(mesh, rules):
      return jitted(state, batch, frozen)

  return run
