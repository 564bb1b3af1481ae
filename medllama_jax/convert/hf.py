"""Hugging Face LLaMA checkpoints ↔ this project's parameter tree.

The model keeps HF's rotate-half rotary layout, so each HF tensor maps to one parameter by a rename, a
transpose (HF stores ``[out, in]``, we store ``[in, out]``) and a reshape that splits heads. The table
below is the single definition of that mapping; import, export and direct loading of HF folders all use
it, tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from medllama_jax import checkpointing, progress, tokenizer
from medllama_jax.checkpointing import ParamPath
from medllama_jax.config import LlamaConfig
from medllama_jax.convert.safetensors_io import SafetensorsWriter
from medllama_jax.convert.sources import ConversionError, TensorSource, open_hf_weights
from medllama_jax.convert.staging import staged_directory

# Buffers some old checkpoints carry that are recomputed, never learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One HF tensor ↔ one parameter: ``to_params`` maps the HF array, ``to_hf`` inverts it."""

  hf_name: str
  path: ParamPath
  hf_shape: tuple[int, ...]
  to_params: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def _split_out_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """q/k/v: HF ``[heads*head_dim, d]`` ↔ ours ``[d, heads, head_dim]``."""
  return (lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], heads, head_dim),
          lambda p: np.ascontiguousarray(p.reshape(p.shape[0], heads * head_dim).T))


def _split_in_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """o: HF ``[d, heads*head_dim]`` ↔ ours ``[heads, head_dim, d]``."""
  return (lambda w: np.ascontiguousarray(w.T).reshape(heads, head_dim, w.shape[0]),
          lambda p: np.ascontiguousarray(p.reshape(heads * head_dim, p.shape[-1]).T))


def tensor_rules(config: LlamaConfig) -> list[TensorRule]:
  """Every tensor of a HF ``LlamaForCausalLM`` for ``config``, in HF's order, with its mapping."""
  d, f, hd = config.hidden_size, config.intermediate_size, config.resolved_head_dim
  h, kv, v = config.num_heads, config.num_kv_heads, config.vocab_size
  rules = [TensorRule("model.embed_tokens.weight", ("embed_tokens",), (v, d), _identity, _identity)]
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", (f"layers_{i}",)
    rules += [
        TensorRule(hf + "input_layernorm.weight", ours + ("input_layernorm", "scale"), (d,),
                   _identity, _identity),
        TensorRule(hf + "self_attn.q_proj.weight", ours + ("self_attn", "q_proj"), (h * hd, d),
                   *_split_out_heads(h, hd)),
        TensorRule(hf + "self_attn.k_proj.weight", ours + ("self_attn", "k_proj"), (kv * hd, d),
                   *_split_out_heads(kv, hd)),
        TensorRule(hf + "self_attn.v_proj.weight", ours + ("self_attn", "v_proj"), (kv * hd, d),
                   *_split_out_heads(kv, hd)),
        TensorRule(hf + "self_attn.o_proj.weight", ours + ("self_attn", "o_proj"), (d, h * hd),
                   *_split_in_heads(h, hd)),
        TensorRule(hf + "post_attention_layernorm.weight", ours + ("post_attention_layernorm", "scale"),
                   (d,), _identity, _identity),
        TensorRule(hf + "mlp.gate_proj.weight", ours + ("mlp", "gate_proj"), (f, d), _transpose,
                   _transpose),
        TensorRule(hf + "mlp.up_proj.weight", ours + ("mlp", "up_proj"), (f, d), _transpose, _transpose),
        TensorRule(hf + "mlp.down_proj.weight", ours + ("mlp", "down_proj"), (d, f), _transpose,
                   _transpose),
    ]
  rules.append(TensorRule("model.norm.weight", ("norm", "scale"), (d,), _identity, _identity))
  if not config.tie_word_embeddings:
    rules.append(TensorRule("lm_head.weight", ("lm_head",), (v, d), _transpose, _transpose))
  return rules


def check_source(source: TensorSource, rules: list[TensorRule], origin: str,
                 config_source: str) -> None:
  """Fails before any conversion work if names or shapes differ from what the config implies.

  ``config_source`` is the file the config was read from (``config.json``, or Meta's
  ``params.json``), named in every error since either it or the weights are wrong.
  """
  expected = {r.hf_name: r for r in rules}
  present = set(source.names())
  missing = [n for n in expected if n not in present]
  tied_head = "lm_head.weight" if "lm_head.weight" not in expected else None
  unexpected = sorted(n for n in present - set(expected)
                      if not n.endswith(_IGNORED_SUFFIXES) and n != tied_head)
  if missing:
    raise ConversionError(f"{origin}: missing tensor(s) {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} required by {config_source}")
  if unexpected:
    raise ConversionError(f"{origin}: unexpected tensor(s) {unexpected[:8]}"
                          f"{' ...' if len(unexpected) > 8 else ''} not in a LLaMA model of "
                          f"{config_source}")
  for rule in rules:
    shape = tuple(source.shape(rule.hf_name))
    if shape != rule.hf_shape:
      raise ConversionError(f"{source.where(rule.hf_name)}: tensor {rule.hf_name!r} has shape {shape}, "
                            f"{config_source} implies {rule.hf_shape}")


def parse_dtype(name: str | None) -> np.dtype | None:
  """``"float32"``/``"bfloat16"``/``"float16"`` → numpy dtype; ``None``/``"auto"`` keeps the stored one."""
  if name in (None, "auto"):
    return None
  import ml_dtypes

  table = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float16": np.dtype(np.float16)}
  if name not in table:
    raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(table)} or 'auto'")
  return table[name]


def converted_tensors(source: TensorSource, rules: list[TensorRule],
                      dtype: np.dtype | None) -> Iterator[tuple[ParamPath, np.ndarray]]:
  """Yields ``(param path, array)`` one at a time, so the caller holds one tensor at a time."""
  for rule in rules:
    array = rule.to_params(source.read(rule.hf_name))
    yield rule.path, (array if dtype is None else array.astype(dtype))


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
  """Tokenizer files and ``generation_config.json`` travel with the weights.

  Contents only: the copies get the mode of any new file (the user's umask), not the source's.
  """
  copied = tokenizer.copy_tokenizer_files(src_dir, dst_dir)
  generation = os.path.join(src_dir, "generation_config.json")
  if os.path.exists(generation):
    shutil.copyfile(generation, os.path.join(dst_dir, "generation_config.json"))
    copied.append("generation_config.json")
  return copied


def hf_to_orbax(hf_dir: str, out_dir: str, dtype: str | None = None) -> LlamaConfig:
  """Converts a HF LLaMA folder into a model folder: ``config.json``, ``params/`` (Orbax), tokenizer."""
  config = LlamaConfig.load_hf_json(hf_dir)
  with open_hf_weights(hf_dir) as source:
    return write_model_folder(source, config, os.path.join(hf_dir, "config.json"), hf_dir, out_dir,
                              dtype, side_files_from=hf_dir)


def write_model_folder(source: TensorSource, config: LlamaConfig, config_source: str, origin: str,
                       out_dir: str, dtype: str | None, side_files_from: str | None) -> LlamaConfig:
  """Checks ``source`` against ``config`` (read from ``config_source``), then streams it into a new
  model folder at ``out_dir``."""
  rules = tensor_rules(config)
  check_source(source, rules, origin, config_source)
  target_dtype = parse_dtype(dtype)
  dtypes: set[str] = set()

  def tensors() -> Iterator[tuple[ParamPath, np.ndarray]]:
    for path, array in _with_progress(converted_tensors(source, rules, target_dtype), len(rules), origin):
      dtypes.add(str(array.dtype))
      yield path, array

  with staged_directory(out_dir) as staging:
    count = checkpointing.save_params_streaming(os.path.join(staging, checkpointing.PARAMS_DIR),
                                                tensors())
    # config.json records the stored dtype (the widest one if a checkpoint mixes them).
    widest = max(dtypes, key=lambda name: np.dtype(name).itemsize)
    config = config.replace(param_dtype=widest)
    config.save_hf_json(staging)
    if side_files_from:
      copy_side_files(side_files_from, staging)
  logging.info("wrote %d tensors (%s) to %s", count, config.param_dtype, out_dir)
  return config


def _with_progress(items: Iterator[Any], total: int, origin: str) -> Iterator[Any]:
  bar = progress.Bar(f"reading {origin}", total, "tensors")
  for item in items:
    yield item
    bar.update()


def _shard_plan(entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                max_shard_bytes: int) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
  shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
  size = 0
  for entry in entries:
    nbytes = int(np.prod(entry[2])) * np.dtype(entry[1]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  return shards


def orbax_to_hf(ckpt_dir: str, out_dir: str, dtype: str | None = None,
                max_shard_bytes: int = 5 * 1024**3, verify_checksums: bool = True) -> str:
  """Exports a model folder to a HF folder that ``transformers`` loads unchanged.

  Tensors are read one at a time from a per-layer checkpoint (one parameter group at a time from a
  stacked, scan-layout one), checked against their recorded checksums unless ``verify_checksums``
  is False, and streamed into safetensors shards with their index.
  """
  config = LlamaConfig.load_hf_json(ckpt_dir)
  params_dir = os.path.join(ckpt_dir, checkpointing.PARAMS_DIR)
  stored = checkpointing.params_metadata(params_dir)
  stacked = checkpointing.checkpoint_layout(stored) == "stacked"
  rules = tensor_rules(config)
  target_dtype = parse_dtype(dtype)

  def stored_path(rule: TensorRule) -> ParamPath:
    return (checkpointing.stacked_path(rule.path) or rule.path) if stacked else rule.path

  missing = sorted({"/".join(stored_path(r)) for r in rules} - {"/".join(p) for p in stored})
  if missing:
    raise ConversionError(f"{params_dir}: missing tensor(s) {missing[:8]} required by config.json")
  if stacked:
    rules.sort(key=lambda r: stored_path(r))  # One stacked group in memory at a time.
  entries = []
  for rule in rules:
    meta = stored[stored_path(rule)]
    shape = meta.shape[1:] if stacked and rule.path != stored_path(rule) else meta.shape
    expected = rule.to_params(np.empty(rule.hf_shape, np.int8)).shape
    if tuple(shape) != tuple(expected):
      raise ConversionError(f"{params_dir}: tensor {'/'.join(stored_path(rule))} has shape "
                            f"{tuple(meta.shape)}, config.json implies {expected}")
    entries.append((rule.hf_name, target_dtype or meta.dtype, rule.hf_shape))
  by_name = {rule.hf_name: rule for rule in rules}
  shards = _shard_plan(entries, max_shard_bytes)

  cached: dict[ParamPath, np.ndarray] = {}

  def read(rule: TensorRule) -> np.ndarray:
    path = stored_path(rule)
    if path not in cached:
      cached.clear()
      cached.update(checkpointing.read_tensors(params_dir, [path], stored,
                                               verify_checksums=verify_checksums))
    array = cached[path]
    if path != rule.path:
      array = array[int(rule.path[0].split("_")[1])]
    return rule.to_hf(array)

  with staged_directory(out_dir) as staging:
    weight_map, total = {}, 0
    bar = progress.Bar(f"exporting to {len(shards)} safetensors file(s)", len(entries), "tensors")
    for index, shard in enumerate(shards, 1):
      filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
      with SafetensorsWriter(os.path.join(staging, filename), shard, {"format": "pt"}) as writer:
        for name, shard_dtype, _ in shard:
          array = read(by_name[name]).astype(shard_dtype)
          writer.write(name, array)
          weight_map[name] = filename
          total += array.nbytes
          bar.update()
    cached.clear()
    with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    export_config = config.replace(param_dtype=str(np.dtype(entries[0][1])))
    export_config.save_hf_json(staging)
    copy_side_files(ckpt_dir, staging)
    _ensure_hf_tokenizer_config(staging)
    if not os.path.exists(os.path.join(staging, "generation_config.json")):
      _write_generation_config(staging, config)
  logging.info("exported %s to %s", ckpt_dir, out_dir)
  return out_dir


def _ensure_hf_tokenizer_config(directory: str) -> None:
  """A bare ``tokenizer.model`` gets the ``tokenizer_config.json`` that ``AutoTokenizer`` needs."""
  has_sp = os.path.exists(os.path.join(directory, "tokenizer.model"))
  if has_sp and not os.path.exists(os.path.join(directory, "tokenizer_config.json")):
    tokenizer.write_hf_tokenizer_config(directory)


def _write_generation_config(directory: str, config: LlamaConfig) -> None:
  generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                "eos_token_id": config.to_hf_dict()["eos_token_id"], "pad_token_id": config.pad_token_id}
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2)
