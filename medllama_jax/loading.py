"""Load a model folder (ours, or a Hugging Face one) straight onto a mesh.

Generation, evaluation and training all start here. A folder with ``params/`` is an Orbax model folder
written by ``medllama-convert``; a folder with safetensors or ``.bin`` weights is read as HF, tensor by
tensor, each tensor placed directly onto its target sharding.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from medllama_jax import checkpointing, partitioning
from medllama_jax.config import LlamaConfig
from medllama_jax.convert import hf
from medllama_jax.convert.sources import open_hf_weights
from medllama_jax.model import Llama
from medllama_jax.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class LoadedModel:
  config: LlamaConfig
  model: Llama
  params: Any
  tokenizer: Tokenizer | None
  mesh: Mesh
  rules: partitioning.LogicalRules


def is_orbax_model_dir(model_dir: str) -> bool:
  return os.path.isdir(os.path.join(model_dir, checkpointing.PARAMS_DIR))


def load_model(model_dir: str, mesh: Mesh, rules: partitioning.LogicalRules | None = None,
               with_tokenizer: bool = True, **runtime: Any) -> LoadedModel:
  """Reads ``config.json``, the weights and the tokenizer of ``model_dir``.

  ``runtime`` overrides how the model runs (``dtype``, ``param_dtype``, ``scan_layers``,
  ``attention_impl``, ``remat_policy``); ``param_dtype`` defaults to the stored dtype.
  """
  rules = partitioning.logical_axis_rules() if rules is None else rules
  config = LlamaConfig.load_hf_json(model_dir).replace(**runtime)
  model = Llama(config)
  boxed = partitioning.abstract_params(model)
  abstract, shardings = partitioning.unbox(boxed), partitioning.logical_shardings(boxed, mesh, rules)
  if is_orbax_model_dir(model_dir):
    params = checkpointing.load_params(os.path.join(model_dir, checkpointing.PARAMS_DIR), abstract,
                                       shardings)
  else:
    params = _load_hf_params(model_dir, config, abstract, shardings)
  tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
  return LoadedModel(config, model, params, tokenizer, mesh, rules)


def _load_hf_params(model_dir: str, config: LlamaConfig, abstract: Any, shardings: Any) -> Any:
  flat_abstract = checkpointing.flatten(abstract)
  flat_shardings = checkpointing.flatten(shardings)
  rules = hf.tensor_rules(config)
  with open_hf_weights(model_dir) as source:
    hf.check_source(source, rules, model_dir, os.path.join(model_dir, "config.json"))
    per_layer: dict[checkpointing.ParamPath, jax.Array] = {}
    for path, array in hf.converted_tensors(source, rules, np.dtype(config.param_dtype)):
      target = checkpointing.stacked_path(path) if config.scan_layers else None
      sharding = flat_shardings[target or path]
      if target is not None:
        sharding = checkpointing.layer_slice_sharding(sharding)
      per_layer[path] = jax.make_array_from_callback(array.shape, sharding, lambda i, a=array: a[i])
  if not config.scan_layers:
    return checkpointing.nest(per_layer)
  out = {}
  for path, spec in flat_abstract.items():
    if path[0] != "layers":
      out[path] = per_layer.pop(path)
      continue
    pieces = [per_layer.pop((f"layers_{i}",) + path[1:]) for i in range(spec.shape[0])]
    out[path] = checkpointing.stack_on_devices(pieces, flat_shardings[path])
  return checkpointing.nest(out)
