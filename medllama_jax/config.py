"""Model hyper-parameters: one frozen dataclass, named presets, and HF ``config.json`` in and out.

The architecture fields mirror Hugging Face's ``LlamaConfig`` so that import and export of a checkpoint
is a rename; the runtime fields (compute dtype, scan, remat, attention back-end) only change how the same
weights are executed and are never written to a checkpoint's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gin
import ml_dtypes
import numpy as np
from etils import epath

RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
# "none" keeps every activation; "full" recomputes the whole layer; the others keep what they name
# (model.py: JAX's dot policies, and MaxText's named-activation policies).
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "nothing_saveable", "minimal",
                  "minimal_with_context", "save_dot_with_context_except_mlp",
                  "save_dot_except_mlpwi", "save_dot_except_mlp", "save_qkv_proj", "save_out_proj")
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash")
STORED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A LLaMA-family decoder: the architecture, then how to run it."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF's dict, frozen (see rope_scaling_dict)
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None

  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"

  def __post_init__(self):
    # Hashable, so a config can be a static argument of jit and an attribute of a Flax module.
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
          "set head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.rope_scaling is not None and self.rope_scaling_dict.get("rope_type") != "llama3":
      raise ValueError(
          f"rope_scaling={self.rope_scaling_dict!r}: only rope_type 'llama3' is supported")
    for name in ("dtype", "param_dtype"):
      np.dtype(getattr(ml_dtypes, getattr(self, name), getattr(self, name)))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count, as the weights are stored (embeddings counted once when tied)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * layer + d + head

  # ---- Hugging Face config.json ----

  def to_hf_dict(self) -> dict[str, Any]:
    """The ``config.json`` of an equivalent ``transformers`` LlamaForCausalLM."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.resolved_head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling_dict,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "pad_token_id": self.pad_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": self.param_dtype,
    }
    return out

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **runtime: Any) -> "LlamaConfig":
    """Builds a config from a HF ``config.json`` dict; refuses what this model would compute wrongly.

    ``runtime`` sets how the model runs. ``param_dtype`` defaults to the stored ``torch_dtype``, so
    a checkpoint loads in the precision it was saved in; a ``param_dtype`` given here wins.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral") or (model_type == "mistral" and hf.get("sliding_window")):
      raise ValueError(f"{source}: model_type={model_type!r} is not a LLaMA-family decoder")
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise ValueError(f"{source}: {flag}=true is not supported (LLaMA2 has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    if hf.get("pretraining_tp", 1) not in (1, None):
      raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported; use 1")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ValueError(f"{source}: missing required field(s) {missing}")
    rope_theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters") or {}
    if rope_theta is None:
      rope_theta = rope_params.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
      rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
      rope_scaling = None
    if rope_scaling is not None and "rope_type" not in rope_scaling:
      rope_scaling = {**rope_scaling, "rope_type": rope_scaling.get("type")}
    if "param_dtype" not in runtime:
      stored_dtype = _stored_dtype(hf, source)
      if stored_dtype is not None:
        runtime = {**runtime, "param_dtype": stored_dtype}
    try:
      return cls(
          vocab_size=hf["vocab_size"],
          hidden_size=hf["hidden_size"],
          intermediate_size=hf["intermediate_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=hf["num_attention_heads"],
          num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
          head_dim=hf.get("head_dim"),
          max_position_embeddings=hf.get("max_position_embeddings", 4096),
          rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
          rope_theta=float(rope_theta),
          rope_scaling=rope_scaling,
          tie_word_embeddings=hf.get("tie_word_embeddings", False),
          bos_token_id=hf.get("bos_token_id"),
          eos_token_id=hf.get("eos_token_id"),
          pad_token_id=hf.get("pad_token_id"),
          **runtime,
      )
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from e

  def save_hf_json(self, directory: str) -> str:
    path = epath.Path(directory) / "config.json"
    path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True))
    return os.fspath(path)

  @classmethod
  def load_hf_json(cls, directory: str, **runtime: Any) -> "LlamaConfig":
    path = epath.Path(directory) / "config.json"
    if not epath.Path(directory).is_dir():
      raise FileNotFoundError(f"{directory}: model folder not found")
    if not path.exists():
      raise FileNotFoundError(f"{directory} is not a model folder: {path} is missing")
    try:
      hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    return cls.from_hf_dict(hf, source=path, **runtime)


def _stored_dtype(hf: dict[str, Any], source: str) -> str | None:
  """The weights' dtype recorded in ``config.json``, as a ``param_dtype``; None when unrecorded.

  transformers writes ``torch_dtype`` (``dtype`` from version 5; older files may say
  ``"torch.float16"``). Loading keeps the stored precision by default, so a bfloat16 checkpoint is
  not silently doubled in memory; "auto" or no entry leaves the float32 default.
  """
  key = "dtype" if hf.get("dtype") is not None else "torch_dtype"
  name = hf.get(key)
  if name in (None, "auto"):
    return None
  dtype = str(name).removeprefix("torch.")
  if dtype not in STORED_DTYPES:
    raise ValueError(f"{source}: {key}={name!r} is not supported; weights must be one of "
                     f"{STORED_DTYPES}")
  return dtype


PRESETS: dict[str, LlamaConfig] = {
    "llama2_7b": LlamaConfig(),
    "llama2_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40),
    "llama2_70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8),
    # Small configs for tests, demos and benchmarks on CPU.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "small": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
                         num_heads=8, num_kv_heads=8, max_position_embeddings=2048),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
  """A preset by name with field overrides, e.g. ``get_config("tiny", dtype="bfloat16")``."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


@gin.configurable
def model_config(preset: str = "tiny", dtype: str = "float32", param_dtype: str = "float32",
                 scan_layers: bool = True, remat_policy: str = "none", attention_impl: str = "xla",
                 overrides: dict[str, Any] | None = None) -> LlamaConfig:
  """The gin entry point for a model: a preset, how to run it, and any architecture overrides."""
  return get_config(preset, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                    remat_policy=remat_policy, attention_impl=attention_impl, **(overrides or {}))
