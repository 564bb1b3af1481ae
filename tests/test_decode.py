"""Tests for medllama_jax.decode on CPU with random tiny models.

The reference for the KV-cache decoder is the model without a cache, re-run over the whole sequence
at every step; sharded runs use 8 virtual CPU devices.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from medllama_jax import decode, partitioning  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.decode import SamplingConfig  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

PROMPTS = [[5, 17, 33], [101, 7, 250, 3, 9, 44, 61], list(range(200, 212))]  # lengths 3, 7, 12
GREEDY = SamplingConfig(max_new_tokens=5)
# (scan_layers, num_kv_heads) with num_heads 4: grouped-query (2) and multi-query (1) attention.
MODEL_VARIANTS = [(True, 2), (False, 2), (True, 1)]


@functools.lru_cache(maxsize=None)
def make_model(scan_layers: bool = True, num_kv_heads: int = 2) -> tuple[Llama, dict]:
  """A random tiny model; the LM head is scaled up so greedy choices are far from ties."""
  model = Llama(get_config("tiny", scan_layers=scan_layers, num_kv_heads=num_kv_heads))
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
  params = partitioning.unbox(params)
  return model, {**params, "lm_head": params["lm_head"] * 4.0}


def forward(model: Llama, params: dict, tokens, positions, segment_ids) -> np.ndarray:
  """The model without a cache: logits ``[b, t, vocab]``."""
  return np.asarray(_jitted_apply(model)({"params": params}, tokens, positions, segment_ids)[0])


@functools.lru_cache(maxsize=None)
def _jitted_apply(model: Llama):
  return jax.jit(model.apply)


def right_pad_tail(tokens, segment_ids, positions, extra: int):
  """Appends ``extra`` padding slots on the right; the causal mask hides them from earlier slots."""
  pad = ((0, 0), (0, extra))
  return np.pad(tokens, pad), np.pad(segment_ids, pad), np.pad(positions, pad)


def reference_greedy(model: Llama, params: dict, prompts, steps: int) -> list[list[int]]:
  """Greedy decoding with no cache: a full forward over prompt + generated-so-far at every step.

  Each step's sequences are left-padded exactly as ``generate`` pads them; a padded tail on the
  right keeps every step's shape the same (one compilation) without changing the logits read.
  """
  generated = [[] for _ in prompts]
  for step in range(steps):
    block = decode.left_pad([p + g for p, g in zip(prompts, generated)])
    tokens, segment_ids, positions = right_pad_tail(*block, extra=steps - 1 - step)
    logits = forward(model, params, tokens, positions, segment_ids)
    last = block[0].shape[1] - 1
    for row, token in enumerate(np.argmax(logits[:, last], axis=-1)):
      generated[row].append(int(token))
  return generated


def test_left_pad():
  tokens, segment_ids, positions = decode.left_pad([[4, 5], [6, 7, 8]], pad_id=9, bucket=4)
  np.testing.assert_array_equal(tokens, [[9, 9, 4, 5], [9, 6, 7, 8]])
  np.testing.assert_array_equal(segment_ids, [[0, 0, 1, 1], [0, 1, 1, 1]])
  np.testing.assert_array_equal(positions, [[0, 0, 0, 1], [0, 0, 1, 2]])
  assert decode.left_pad([[1]], length=5, bucket=4)[0].shape == (1, 8)
  with pytest.raises(ValueError):
    decode.left_pad([[1, 2, 3]], length=2)


def test_invalid_arguments():
  for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(max_new_tokens=0)):
    with pytest.raises(ValueError):
      SamplingConfig(**bad)
  model, params = make_model()
  with pytest.raises(ValueError):
    decode.generate(model, params, [[1], []], GREEDY, eos_ids=())
  with pytest.raises(ValueError):
    decode.score(model, params, [([1], [])])


@pytest.mark.parametrize("scan_layers,num_kv_heads", MODEL_VARIANTS)
def test_cached_greedy_matches_full_recompute(scan_layers, num_kv_heads):
  model, params = make_model(scan_layers, num_kv_heads)
  got = decode.generate(model, params, PROMPTS, GREEDY, eos_ids=())
  assert got == reference_greedy(model, params, PROMPTS, GREEDY.max_new_tokens)


def test_batched_equals_one_at_a_time():
  model, params = make_model()
  batched = decode.generate(model, params, PROMPTS, GREEDY, eos_ids=())
  # bucket=16 gives each lone prompt a different amount of padding than it has in the batch.
  alone = [decode.generate(model, params, [p], GREEDY, eos_ids=(), bucket=16)[0] for p in PROMPTS]
  assert batched == alone


def cut_at_eos(ids: list[int], eos_ids) -> list[int]:
  return ids[:next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))]


def _run_raw(model, params, prompts, sampling, eos_ids):
  tokens, segment_ids, positions = decode.left_pad(prompts)
  eos = np.full(8, -1, np.int32)
  eos[:len(eos_ids)] = eos_ids
  out, lengths, steps = decode._generate_jit(
      params, tokens, positions, segment_ids, eos,
      jax.random.key(sampling.seed), model=model, sampling=sampling, mesh=None, rules=None)
  return np.asarray(out), np.asarray(lengths), int(steps)


def test_eos_truncates_and_is_excluded():
  model, params = make_model()
  free = decode.generate(model, params, PROMPTS, GREEDY, eos_ids=())
  assert all(len(g) == GREEDY.max_new_tokens for g in free)
  # The first token of row 0 at step >= 2 that it has not emitted before becomes the EOS id.
  step = next(s for s in range(2, len(free[0])) if free[0][s] not in free[0][:s])
  eos = free[0][step]
  got = decode.generate(model, params, PROMPTS, GREEDY, eos_ids=(eos,))
  assert got[0] == free[0][:step]
  assert got == [cut_at_eos(g, (eos,)) for g in free]
  # Any of several EOS ids ends a row.
  both = (eos, free[1][1])
  assert decode.generate(model, params, PROMPTS, GREEDY, eos_ids=both) == [
      cut_at_eos(g, both) for g in free]


def test_early_stop_when_all_rows_done():
  model, params = make_model()
  sampling = GREEDY
  free = decode.generate(model, params, PROMPTS, sampling, eos_ids=())
  _, lengths, steps = _run_raw(model, params, PROMPTS, sampling, ())
  assert steps == sampling.max_new_tokens and list(lengths) == [5, 5, 5]
  # Every row's first token is an EOS id: one sampling step (the prefill's), nothing returned.
  first_tokens = sorted({g[0] for g in free})
  _, lengths, steps = _run_raw(model, params, PROMPTS, sampling, first_tokens)
  assert steps == 1 and list(lengths) == [0, 0, 0]
  assert decode.generate(model, params, PROMPTS, sampling, eos_ids=first_tokens) == [[], [], []]
  # Otherwise the loop runs until the last row finishes, not to max_new_tokens.
  eos_ids = sorted({free[0][0], free[1][0], free[2][2]})
  first_eos = [len(cut_at_eos(g, eos_ids)) for g in free]
  _, lengths, steps = _run_raw(model, params, PROMPTS, sampling, eos_ids)
  assert list(lengths) == first_eos
  assert steps == min(max(first_eos) + 1, sampling.max_new_tokens) < sampling.max_new_tokens


def test_sampling_seed_determinism_and_greedy_limits():
  model, params = make_model()
  hot = SamplingConfig(temperature=2.0, max_new_tokens=5, seed=1)
  first = decode.generate(model, params, PROMPTS, hot, eos_ids=())
  assert decode.generate(model, params, PROMPTS, hot, eos_ids=()) == first
  other = decode.generate(model, params, PROMPTS, dataclasses.replace(hot, seed=2), eos_ids=())
  assert other != first
  greedy = decode.generate(model, params, PROMPTS, dataclasses.replace(hot, temperature=0.0),
                           eos_ids=())
  assert greedy != first
  top1 = SamplingConfig(temperature=2.0, top_k=1, max_new_tokens=5, seed=3)
  assert decode.generate(model, params, PROMPTS, top1, eos_ids=()) == greedy


def test_top_k_1_and_tiny_top_p_are_greedy():
  logits = jax.random.normal(jax.random.key(7), (1000, 512))
  greedy = np.asarray(decode.sample_logits(logits, jax.random.key(0), SamplingConfig()))
  for cfg in (SamplingConfig(temperature=5.0, top_k=1),
              SamplingConfig(temperature=5.0, top_p=1e-6)):
    np.testing.assert_array_equal(decode.sample_logits(logits, jax.random.key(8), cfg), greedy)


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
NUM_SAMPLES = 40_000
# The standard error of a frequency is at most sqrt(0.25 / 40000) = 0.0025; allow 4 of them.
FREQ_TOL = 0.01


def _frequencies(cfg: SamplingConfig) -> np.ndarray:
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (NUM_SAMPLES, LOGITS.size))
  ids = np.asarray(decode.sample_logits(logits, jax.random.key(cfg.seed), cfg))
  return np.bincount(ids, minlength=LOGITS.size) / NUM_SAMPLES


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max())
  return e / e.sum()


def test_temperature_sampling_matches_softmax():
  cfg = SamplingConfig(temperature=0.7, seed=4)
  np.testing.assert_allclose(_frequencies(cfg), _softmax(LOGITS / 0.7), atol=FREQ_TOL)


def test_top_k_and_top_p_filters():
  freqs = _frequencies(SamplingConfig(temperature=1.0, top_k=3, seed=5))
  assert np.all(freqs[3:] == 0)  # never outside the top 3
  np.testing.assert_allclose(freqs[:3], _softmax(LOGITS[:3]), atol=FREQ_TOL)
  # softmax(LOGITS) = .561, .206, .125, .076, ...: the mass before token 2 is .767 < .8, before
  # token 3 it is .892, so the nucleus is tokens 0-2.
  freqs = _frequencies(SamplingConfig(temperature=1.0, top_p=0.8, seed=6))
  assert np.all(freqs[3:] == 0)
  np.testing.assert_allclose(freqs[:3], _softmax(LOGITS[:3]), atol=FREQ_TOL)
  greedy = np.asarray(decode.sample_logits(jnp.asarray(LOGITS[None]), jax.random.key(0),
                                           SamplingConfig()))
  assert greedy.tolist() == [0]


def test_score_matches_full_forward_log_softmax():
  model, params = make_model()
  greedy = decode.generate(model, params, PROMPTS, GREEDY, eos_ids=())
  pairs = [(PROMPTS[0], greedy[0]), (PROMPTS[1], greedy[1][:2]), (PROMPTS[2], [1, 2, 3, 4]),
           ([9], [greedy[0][0]])]
  got = decode.score(model, params, pairs, bucket=8)
  # Reference: each sequence from slot 0 (right-padded, unlike score's left padding), log_softmax.
  sequences = [p + c for p, c in pairs]
  width = max(map(len, sequences))
  tokens = np.zeros((len(pairs), width), np.int32)
  segment_ids = np.zeros_like(tokens)
  for row, seq in enumerate(sequences):
    tokens[row, :len(seq)], segment_ids[row, :len(seq)] = seq, 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
  logprobs = np.asarray(jax.nn.log_softmax(forward(model, params, tokens, positions, segment_ids)))
  for row, ((prompt, continuation), (logprob, is_greedy)) in enumerate(zip(pairs, got)):
    targets = range(len(prompt), len(prompt) + len(continuation))
    expected = sum(logprobs[row, t - 1, tokens[row, t]] for t in targets)
    np.testing.assert_allclose(logprob, expected, rtol=1e-5, atol=1e-4)
    assert is_greedy == all(np.argmax(logprobs[row, t - 1]) == tokens[row, t] for t in targets)
  assert [g for _, g in got[:2]] == [True, True]
  assert got[2][1] is False


def _sharded():
  model, params = make_model()
  mesh = partitioning.make_mesh(2, 2, 2)
  rules = partitioning.logical_axis_rules()
  sharded = jax.device_put(params, partitioning.param_shardings(model, mesh, rules))
  return model, params, sharded, mesh, rules


# Batch 4 is split over data x fsdp = 4 devices; batch 3 is not, so its inputs are replicated.
@pytest.mark.parametrize("prompts", [PROMPTS + [[8, 8]], PROMPTS], ids=["batch4", "batch3"])
def test_sharded_generation_matches_unsharded(prompts):
  model, params, sharded, mesh, rules = _sharded()
  expected = decode.generate(model, params, prompts, GREEDY, eos_ids=())
  got = decode.generate(model, sharded, prompts, GREEDY, eos_ids=(), mesh=mesh, rules=rules)
  assert got == expected


def test_sharded_score_matches_unsharded():
  model, params, sharded, mesh, rules = _sharded()
  pairs = [(p, [7, 11]) for p in PROMPTS + [[8, 8]]]
  got = decode.score(model, sharded, pairs, mesh=mesh, rules=rules, bucket=16)
  expected = decode.score(model, params, pairs, bucket=16)
  np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in expected], rtol=1e-5,
                             atol=1e-4)
  assert [g for _, g in got] == [g for _, g in expected]
