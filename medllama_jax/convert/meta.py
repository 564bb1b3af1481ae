"""Meta's original LLaMA release format → a model folder.

Meta ships ``params.json`` and one ``consolidated.NN.pth`` per model-parallel rank (1 for 7B, 2 for 13B,
8 for 70B), each holding a slice of every sharded tensor, with q/k rows in interleaved rotary pairs.
``MetaSource`` presents those files as a HF-named tensor source: it concatenates the rank slices and
permutes q/k rows into HF's rotate-half layout as each tensor is read, so the HF import path does the
rest and both imports share one mapping.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from medllama_jax.config import LlamaConfig
from medllama_jax.convert import hf
from medllama_jax.convert.sources import ConversionError, TensorSource, load_torch_file, torch_to_numpy

# Axis along which each Meta tensor is split across model-parallel ranks (None: replicated).
_SPLIT_AXIS = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None,
}

_HF_NAME = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _meta_suffix(name: str) -> str:
  return name.split(".", 2)[2] if name.startswith("layers.") else name


def meta_to_hf_name(name: str) -> str | None:
  """``layers.3.attention.wq.weight`` → ``model.layers.3.self_attn.q_proj.weight``."""
  if name == "tok_embeddings.weight":
    return "model.embed_tokens.weight"
  if name == "output.weight":
    return "lm_head.weight"
  if name == "norm.weight":
    return "model.norm.weight"
  if name.startswith("layers."):
    layer, suffix = name.split(".")[1], _meta_suffix(name)
    if suffix in _HF_NAME:
      return f"model.layers.{layer}.{_HF_NAME[suffix]}"
  return None


def interleaved_to_rotate_half(w: np.ndarray, heads: int) -> np.ndarray:
  """Reorders q/k projection rows from Meta's interleaved rotary pairs to HF's rotate-half layout."""
  rows, cols = w.shape
  return np.ascontiguousarray(w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3)
                              .reshape(rows, cols))


def config_from_params_json(path: str, vocab_size: int, intermediate_size: int, num_layers: int,
                            kv_proj_rows: int) -> LlamaConfig:
  """A ``LlamaConfig`` from Meta's ``params.json``, checked against the sizes the weights imply.

  Every size is checked here, where a mismatch can be blamed on ``params.json`` by field and value;
  the later tensor-by-tensor check only knows the shapes the config implies, not which field is
  wrong.
  ``kv_proj_rows`` is the full (all ranks) row count of ``wk``: ``n_kv_heads * dim / n_heads``.
  """
  try:
    with open(path) as f:
      params = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: cannot read ({e})") from e
  for field in ("dim", "n_layers", "n_heads"):
    if field not in params:
      raise ConversionError(f"{path}: missing required field {field!r}")
  dim, multiple_of = params["dim"], params.get("multiple_of", 256)
  hidden = int(2 * 4 * dim / 3)
  if params.get("ffn_dim_multiplier") is not None:
    hidden = int(params["ffn_dim_multiplier"] * hidden)
  hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
  if hidden != intermediate_size:
    raise ConversionError(f"{path}: dim/multiple_of/ffn_dim_multiplier imply an MLP width of {hidden}, "
                          f"but the weights have {intermediate_size}")
  if params.get("vocab_size", -1) not in (-1, vocab_size):
    raise ConversionError(f"{path}: vocab_size={params['vocab_size']}, but tok_embeddings has "
                          f"{vocab_size} rows")
  if params["n_layers"] != num_layers:
    raise ConversionError(f"{path}: n_layers={params['n_layers']}, but the weights have "
                          f"{num_layers} layers")
  n_heads = params["n_heads"]
  n_kv_heads = params.get("n_kv_heads") or n_heads
  if dim % n_heads == 0 and n_kv_heads * (dim // n_heads) != kv_proj_rows:
    raise ConversionError(
        f"{path}: n_heads={n_heads} and n_kv_heads={n_kv_heads} give head_dim {dim // n_heads} "
        f"and {n_kv_heads * (dim // n_heads)} rows of attention.wk, but the weights have "
        f"{kv_proj_rows}")
  try:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=n_heads, num_kv_heads=n_kv_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_position_embeddings=params.get("max_seq_len", 4096))
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from e


class MetaSource(TensorSource):
  """Meta ``consolidated.*.pth`` shards read lazily (mmap) and presented under HF names and layout."""

  def __init__(self, meta_dir: str):
    self._files = sorted(glob.glob(os.path.join(meta_dir, "consolidated.*.pth")))
    if not self._files:
      raise ConversionError(f"{meta_dir}: no consolidated.*.pth files")
    self._shards: list[dict[str, Any]] = [load_torch_file(p) for p in self._files]
    names = [n for n in self._shards[0] if n != "rope.freqs"]
    for path, shard in zip(self._files[1:], self._shards[1:]):
      if set(n for n in shard if n != "rope.freqs") != set(names):
        raise ConversionError(f"{path}: holds different tensors from {self._files[0]}")
    self._meta_of: dict[str, str] = {}
    for name in names:
      hf_name = meta_to_hf_name(name)
      if hf_name is None:
        raise ConversionError(f"{self._files[0]}: unexpected tensor {name!r} in a LLaMA checkpoint")
      self._meta_of[hf_name] = name
    for required in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight",
                     "layers.0.attention.wk.weight"):
      if required not in self._shards[0]:
        raise ConversionError(f"{self._files[0]}: missing tensor {required!r}")
    self.params_json = os.path.join(meta_dir, "params.json")
    self.config = config_from_params_json(
        self.params_json,
        vocab_size=int(self._shards[0]["tok_embeddings.weight"].shape[0]),
        intermediate_size=int(self._shards[0]["layers.0.feed_forward.w1.weight"].shape[0])
        * len(self._files),
        num_layers=len({name.split(".")[1] for name in names if name.startswith("layers.")}),
        kv_proj_rows=int(self._shards[0]["layers.0.attention.wk.weight"].shape[0])
        * len(self._files))

  def names(self) -> list[str]:
    return list(self._meta_of)

  def shape(self, name: str) -> tuple[int, ...]:
    meta = self._meta_of[name]
    shape = list(self._shards[0][meta].shape)
    axis = _SPLIT_AXIS[_meta_suffix(meta)]
    if axis is not None:
      shape[axis] = sum(int(s[meta].shape[axis]) for s in self._shards)
    return tuple(shape)

  def read(self, name: str) -> np.ndarray:
    meta = self._meta_of[name]
    axis = _SPLIT_AXIS[_meta_suffix(meta)]
    try:
      pieces = [torch_to_numpy(s[meta]) for s in (self._shards if axis is not None else self._shards[:1])]
    except Exception as e:  # A truncated mmapped file fails only when its bytes are touched.
      raise ConversionError(f"{self.where(name)}: tensor {meta!r} cannot be read ({e})") from e
    array = pieces[0] if axis is None else np.concatenate(pieces, axis=axis)
    if meta.endswith("attention.wq.weight"):
      array = interleaved_to_rotate_half(array, self.config.num_heads)
    elif meta.endswith("attention.wk.weight"):
      array = interleaved_to_rotate_half(array, self.config.num_kv_heads)
    return array

  def where(self, name: str) -> str:
    return ", ".join(self._files)

  def close(self) -> None:
    self._shards = []


def meta_to_orbax(meta_dir: str, out_dir: str, dtype: str | None = None,
                  tokenizer_dir: str | None = None) -> LlamaConfig:
  """Converts Meta's release format into a model folder; the tokenizer comes from ``meta_dir`` or
  ``tokenizer_dir`` (Meta ships ``tokenizer.model`` beside the size folders)."""
  with MetaSource(meta_dir) as source:
    tokenizer_from = tokenizer_dir or meta_dir
    return hf.write_model_folder(source, source.config, source.params_json, meta_dir, out_dir,
                                 dtype, side_files_from=tokenizer_from)
