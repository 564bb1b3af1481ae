"""Shared builders for the model, conversion and partitioning tests.

Tiny ``transformers`` LLaMA models are the reference: built with a fixed torch seed, their RMSNorm
weights perturbed so the norms matter, saved with ``save_pretrained`` and compared with ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from medllama_jax import checkpointing, partitioning  # noqa: E402

# Weight init of the reference models: larger than HF's 0.02 so attention is far from uniform and
# rotary positions, masks and norms visibly change the logits.
INIT_RANGE = 0.15


def hf_config(**overrides: Any) -> transformers.LlamaConfig:
  kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, initializer_range=INIT_RANGE, tie_word_embeddings=False)
  kwargs.update(overrides)
  return transformers.LlamaConfig(**kwargs)


def make_hf_model(seed: int = 0, dtype: torch.dtype = torch.float32,
                  **overrides: Any) -> transformers.LlamaForCausalLM:
  """A random ``LlamaForCausalLM`` in eval mode, RMSNorm weights drawn around 1 (not all ones)."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_config(**overrides)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
  return model.to(dtype)


def save_hf_model(model: transformers.LlamaForCausalLM, directory: os.PathLike | str) -> str:
  model.save_pretrained(os.fspath(directory))
  return os.fspath(directory)


def hf_logits(model: transformers.LlamaForCausalLM, tokens: np.ndarray,
              positions: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    kwargs = {} if positions is None else {"position_ids": torch.as_tensor(positions, dtype=torch.long)}
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs).logits
  return out.float().numpy()


def one_device_mesh() -> jax.sharding.Mesh:
  return partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def default_positions(tokens: np.ndarray) -> np.ndarray:
  return np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()


def forward(loaded, tokens: np.ndarray, positions: np.ndarray | None = None,
            segment_ids: np.ndarray | None = None) -> np.ndarray:
  """Logits of a ``loading.LoadedModel`` through ``partitioning.make_forward`` on its own mesh."""
  tokens = np.asarray(tokens, np.int32)
  positions = default_positions(tokens) if positions is None else np.asarray(positions, np.int32)
  segment_ids = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
  shardings = jax.tree.map(lambda x: x.sharding, loaded.params)
  run = partitioning.make_forward(loaded.model, loaded.mesh, loaded.rules, shardings, tokens.shape)
  return np.asarray(run(loaded.params, tokens, positions, segment_ids))


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_tokens(vocab_size: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab_size, shape).astype(np.int32)


def host_params(params: Any) -> dict[tuple[str, ...], np.ndarray]:
  """A (possibly sharded) parameter tree as a flat dict of host numpy arrays."""
  return {path: np.asarray(value) for path, value in checkpointing.flatten(params).items()}


def orbax_tensors(model_dir: os.PathLike | str) -> dict[tuple[str, ...], np.ndarray]:
  """Every tensor of a model folder's ``params/`` checkpoint, as stored."""
  params_dir = os.path.join(os.fspath(model_dir), checkpointing.PARAMS_DIR)
  metadata = checkpointing.params_metadata(params_dir)
  return checkpointing.read_tensors(params_dir, metadata.keys(), metadata)


def assert_bit_exact(actual: dict, expected: dict) -> None:
  assert set(actual) == set(expected)
  for key in expected:
    a, e = np.asarray(actual[key]), np.asarray(expected[key])
    assert a.dtype == e.dtype, (key, a.dtype, e.dtype)
    assert a.shape == e.shape, (key, a.shape, e.shape)
    assert a.tobytes() == e.tobytes(), key


# ---- Meta's release format, built from a HF model ----

# Axis each Meta tensor is split along across model-parallel ranks (None: every rank holds a copy).
_META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0,
               "w2": 1}


def rotate_half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
  """Inverse of HF's ``permute`` in convert_llama_weights_to_hf: q/k rows back to Meta's layout."""
  rows, cols = w.shape
  return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_dict(model: transformers.LlamaForCausalLM) -> dict[str, torch.Tensor]:
  cfg = model.config
  sd = model.state_dict()
  out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
         "norm.weight": sd["model.norm.weight"],
         "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
  for i in range(cfg.num_hidden_layers):
    p, m = f"model.layers.{i}.", f"layers.{i}."
    out[m + "attention.wq.weight"] = rotate_half_to_interleaved(sd[p + "self_attn.q_proj.weight"],
                                                                cfg.num_attention_heads)
    out[m + "attention.wk.weight"] = rotate_half_to_interleaved(sd[p + "self_attn.k_proj.weight"],
                                                                cfg.num_key_value_heads)
    out[m + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
    out[m + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
    out[m + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
    out[m + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
    out[m + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    out[m + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
    out[m + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
  return out


def write_meta_checkpoint(model: transformers.LlamaForCausalLM, directory: os.PathLike | str,
                          num_shards: int, multiple_of: int = 256, rope_freqs: bool = False,
                          **params_overrides: Any) -> str:
  """``consolidated.NN.pth`` (one per model-parallel rank) and ``params.json`` for ``model``.

  ``rope_freqs`` adds the ``rope.freqs`` buffer early Meta releases carry in every shard.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  cfg = model.config
  state = meta_state_dict(model)
  if rope_freqs:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    state["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
  for rank in range(num_shards):
    shard = {}
    for name, value in state.items():
      axis = _META_SPLIT.get(name.split(".")[-2])
      piece = value if axis is None else value.chunk(num_shards, dim=axis)[rank]
      shard[name] = piece.clone().contiguous()
    torch.save(shard, os.path.join(directory, f"consolidated.{rank:02d}.pth"))
  params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
            "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
            "multiple_of": multiple_of, "norm_eps": cfg.rms_norm_eps, "vocab_size": -1}
  params.update(params_overrides)
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)
  return directory
