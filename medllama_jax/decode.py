"""Batched generation and continuation scoring with a KV cache (generation CLI and evaluator).

Why it is built this way:

* Prompts are left-padded to one length (``left_pad``) so that every row's last prompt token sits
  in the same cache slot: the model's KV cache has one write index for the whole batch, and a
  single prefill call over the padded block fills it. Padding carries segment id 0, which the
  attention mask keeps apart from real tokens, and each row's positions count only its own tokens,
  so a row generates the same ids whatever padding its batch-mates impose on it.
* Prefill and the entire decode loop are one jitted function: a ``lax.while_loop`` feeds one token
  per step, so there is no host round trip per token, a batch costs one compilation per (batch
  size, padded length, sampling settings), and the loop exits as soon as every row has produced an
  end-of-sequence id. The seed and the EOS ids are traced, so changing them does not recompile.
* ``score`` is teacher forcing in one forward pass: the per-continuation log-likelihood (and
  whether the continuation is the greedy one) that log-likelihood multiple choice needs, reduced
  on device so the ``[batch, length, vocab]`` logits never reach the host.

End of sequence: a row stops at its first id in ``eos_ids``; the returned ids are the ones before
it (the EOS id itself is not included), and whatever a finished row computes while the rest of the
batch goes on is discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medllama_jax import partitioning
from medllama_jax.model import KVCache, Llama

_CACHE_AXES = (None, "activation_batch", "activation_length", "activation_kv_heads", None)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How each next token is picked, and how many at most.

  ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` turn those filters off;
  ``max_new_tokens`` bounds the sampled ids per row (an EOS counts, though it is not returned).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_new_tokens: int = 64

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None,
             bucket: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-aligns ``prompts`` in one ``[batch, L]`` block: ``(tokens, segment_ids, positions)``.

  ``L`` is ``length`` (default: the longest prompt) rounded up to a multiple of ``bucket``, so that
  batches of similar lengths share one compiled program. Real tokens have segment id 1 and positions
  ``0..n-1``; padding has ``pad_id``, segment id 0 and position 0. All three are int32.
  """
  if not prompts:
    raise ValueError("left_pad: no prompts")
  if bucket < 1:
    raise ValueError(f"left_pad: bucket={bucket} must be >= 1")
  longest = max(len(p) for p in prompts)
  if length is None:
    length = longest
  elif length < longest:
    raise ValueError(f"left_pad: length={length} is shorter than the longest prompt ({longest})")
  length = -(-length // bucket) * bucket
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids = np.zeros((len(prompts), length), np.int32)
  positions = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    n = len(prompt)
    if n:
      tokens[row, length - n:] = np.asarray(prompt, np.int32)
      segment_ids[row, length - n:] = 1
      positions[row, length - n:] = np.arange(n, dtype=np.int32)
  return tokens, segment_ids, positions


def sample_logits(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Next-token ids ``[b]`` (int32) from ``logits`` ``[b, vocab]``.

  Greedy argmax when ``cfg.temperature == 0``. Otherwise the logits are divided by the
  temperature, restricted to the ``top_k`` largest, then to the nucleus: the smallest prefix of the
  remaining tokens, by decreasing probability, whose mass reaches ``top_p`` (the most likely token
  is always kept). Tokens tied with the last one kept are kept too. One sample per row from ``rng``.
  """
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / cfg.temperature
  vocab = logits.shape[-1]
  if (0 < cfg.top_k < vocab) or cfg.top_p < 1.0:
    k = cfg.top_k if 0 < cfg.top_k < vocab else vocab
    top = jax.lax.top_k(logits, k)[0]  # [b, k], descending
    if cfg.top_p < 1.0:
      probs = jax.nn.softmax(top, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs  # exactly 0 for the top token
      num_kept = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)
      threshold = jnp.take_along_axis(top, num_kept - 1, axis=-1)
    else:
      threshold = top[:, -1:]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _rules_for(mesh: Mesh | None, rules: partitioning.LogicalRules | None
               ) -> tuple[tuple[str, Any], ...] | None:
  """The logical rules as a hashable tuple (a jit static argument), or None when not sharding."""
  if mesh is None:
    return None
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in partitioning.logical_axis_rules(rules))


def _constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
               rules: partitioning.LogicalRules | None) -> jax.Array:
  if mesh is None:
    return x
  spec = partitioning.spec_for(x.shape, logical_axes, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _replicated(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Replicates a small result so that every host can read all of it."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


def _rules_context(rules: partitioning.LogicalRules | None):
  # Entered inside the traced function so that the static ``rules`` argument, which keys jit's
  # cache, is also what the model's logical constraints resolve against.
  return nn.logical_axis_rules(rules) if rules is not None else contextlib.nullcontext()


def _place(arrays: Sequence[np.ndarray], mesh: Mesh | None,
           rules: partitioning.LogicalRules | None) -> list[jax.Array]:
  """Puts ``[batch, length]`` host arrays on device, batch-sharded where the mesh divides them."""
  if mesh is None:
    return [jnp.asarray(a) for a in arrays]
  return [jax.device_put(a, partitioning.shard_batch_spec(mesh, rules, a.shape)) for a in arrays]


@functools.partial(jax.jit, static_argnames=("model", "sampling", "mesh", "rules"))
def _generate_jit(params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                  eos: jax.Array, rng: jax.Array, *, model: Llama, sampling: SamplingConfig,
                  mesh: Mesh | None, rules: partitioning.LogicalRules | None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Prefill and decode loop: ``(ids [b, max_new], kept lengths [b], sampling steps run)``.

  ``eos`` ``[n]`` holds the end-of-sequence ids. Row ``i``'s answer is ``ids[i, :lengths[i]]``:
  the ids before its first EOS.
  """
  batch, prompt_len = tokens.shape
  max_new = sampling.max_new_tokens
  with _rules_context(rules):
    # The prefill writes slots [0, L); decode step s (1-based) writes slot L + s - 1.
    cache = KVCache.init(model.config, batch, prompt_len + max_new - 1)
    cache = cache._replace(key=_constrain(cache.key, _CACHE_AXES, mesh, rules),
                           value=_constrain(cache.value, _CACHE_AXES, mesh, rules))
    logits, cache = model.apply({"params": params}, tokens, positions, segment_ids, cache=cache,
                                last_logits_only=True, prefill=True)
    first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), sampling)
    done = jnp.isin(first, eos)
    out = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(first)
    lengths = (~done).astype(jnp.int32)
    next_positions = positions[:, -1] + 1
    step_segment_ids = jnp.ones((batch, 1), jnp.int32)

    def cond(state):
      step, _, _, _, done, _, _ = state
      return (step < max_new) & ~jnp.all(done)

    def body(state):
      step, cache, last, pos, done, out, lengths = state
      logits, cache = model.apply({"params": params}, last[:, None], pos[:, None],
                                  step_segment_ids, cache=cache)
      token = sample_logits(logits[:, 0], jax.random.fold_in(rng, step), sampling)
      out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
      hit_eos = jnp.isin(token, eos)
      lengths = lengths + (~done & ~hit_eos).astype(jnp.int32)
      return step + 1, cache, token, pos + 1, done | hit_eos, out, lengths

    state = (jnp.ones((), jnp.int32), cache, first, next_positions, done, out, lengths)
    steps, _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, state)
  return _replicated(out, mesh), _replicated(lengths, mesh), steps


def generate(model: Llama, params: Any, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             eos_ids: Sequence[int], pad_id: int = 0, mesh: Mesh | None = None,
             rules: partitioning.LogicalRules | None = None, bucket: int = 1) -> list[list[int]]:
  """Continues each prompt; returns only the new ids per prompt, without the EOS that ended it.

  Each row stops at its first id in ``eos_ids`` (excluded from the result) or after
  ``sampling.max_new_tokens`` ids; the loop ends when every row has stopped. Every prompt needs at
  least one token. With ``mesh`` (``rules`` default to ``partitioning.logical_axis_rules()``) the
  call runs under ``partitioning.activate``, the batch sharded over the data axes where they
  divide it; ``params`` must already be placed (e.g. with ``partitioning.param_shardings``).
  ``bucket`` rounds the padded prompt length up, to limit recompilation. The result is a function
  of the inputs and ``sampling.seed``; when sampling, a row's ids also depend on its batch-mates.
  """
  if any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  tokens, segment_ids, positions = left_pad(prompts, pad_id, bucket=bucket)
  rules = _rules_for(mesh, rules)
  # Padded with -1 (never sampled) to a multiple of 8: the number of EOS ids rarely recompiles.
  eos_ids = [int(e) for e in eos_ids]
  eos = np.full(-(-max(len(eos_ids), 1) // 8) * 8, -1, np.int32)
  eos[:len(eos_ids)] = eos_ids
  context = partitioning.activate(mesh, rules) if mesh is not None else contextlib.nullcontext()
  with context:
    tokens, positions, segment_ids = _place((tokens, positions, segment_ids), mesh, rules)
    out, lengths, _ = _generate_jit(params, tokens, positions, segment_ids, eos,
                                    jax.random.key(sampling.seed), model=model,
                                    sampling=dataclasses.replace(sampling, seed=0), mesh=mesh,
                                    rules=rules)
  out, lengths = jax.device_get((out, lengths))
  return [row[:n].tolist() for row, n in zip(out, lengths)]


@functools.partial(jax.jit, static_argnames=("model", "mesh", "rules"))
def _score_jit(params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               is_target: jax.Array, *, model: Llama, mesh: Mesh | None,
               rules: partitioning.LogicalRules | None) -> tuple[jax.Array, jax.Array]:
  """Sum of the target tokens' log-probabilities ``[b]``; whether every target is the argmax."""
  with _rules_context(rules):
    logits, _ = model.apply({"params": params}, tokens, positions, segment_ids)
  logits, targets, mask = logits[:, :-1], tokens[:, 1:], is_target[:, 1:]
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(mask, target_logprobs, 0.0), axis=-1)
  greedy = jnp.all(~mask | (jnp.argmax(logits, axis=-1) == targets), axis=-1)
  return _replicated(total, mesh), _replicated(greedy, mesh)


def score(model: Llama, params: Any,
          prompts_and_continuations: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
          mesh: Mesh | None = None, rules: partitioning.LogicalRules | None = None,
          bucket: int = 1) -> list[tuple[float, bool]]:
  """``(sum of log p(continuation | prompt), continuation is the greedy decoding)`` per pair.

  One batched, left-padded forward pass with teacher forcing. Prompts and continuations must both be
  non-empty. ``mesh``, ``rules`` and ``bucket`` are as for ``generate``.
  """
  for i, (prompt, continuation) in enumerate(prompts_and_continuations):
    if len(prompt) == 0 or len(continuation) == 0:
      raise ValueError(f"score: pair {i} has an empty prompt or continuation")
  sequences = [list(p) + list(c) for p, c in prompts_and_continuations]
  tokens, segment_ids, positions = left_pad(sequences, pad_id, bucket=bucket)
  is_target = np.zeros_like(segment_ids, dtype=bool)
  for row, (_, continuation) in enumerate(prompts_and_continuations):
    is_target[row, tokens.shape[1] - len(continuation):] = True
  rules = _rules_for(mesh, rules)
  context = partitioning.activate(mesh, rules) if mesh is not None else contextlib.nullcontext()
  with context:
    arrays = _place((tokens, positions, segment_ids, is_target), mesh, rules)
    total, greedy = _score_jit(params, *arrays, model=model, mesh=mesh, rules=rules)
  total, greedy = jax.device_get((total, greedy))
  return [(float(t), bool(g)) for t, g in zip(total, greedy)]
