"""Load a model folder (ours, or a Hugging Face one) straight onto a mesh, and write model folders.

Generation, evaluation and training all start here. A folder with ``params/`` is an Orbax model folder
written by ``medllama-convert``; a folder with safetensors or ``.bin`` weights is read as HF, tensor by
tensor, each tensor placed directly onto its target sharding.

LoRA adapters are a folder of their own (``params/`` with the adapters alone and ``lora_config.json``,
which names the base model folder): ``load_model(base, adapters=DIR)`` runs them unmerged, and
``merge_lora`` writes the merged model folder that the HF exporter reads.

``load_run_checkpoint`` reads the trained parameters of one checkpoint of a training run
(``run_dir/checkpoints/<step>/``) as a model, e.g. to follow a score along a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from orbax.checkpoint import v1 as ocp_v1

from medllama_jax import checkpointing, lora, partitioning, storage, tokenizer as tokenizer_lib
from medllama_jax.config import LlamaConfig
from medllama_jax.convert import hf
from medllama_jax.convert.sources import open_hf_weights
from medllama_jax.model import Llama
from medllama_jax.tokenizer import Tokenizer, load_tokenizer
from medllama_jax.train import checkpoints as checkpoints_lib


# A training run's layout (``medllama_jax.train.loop``).
RUN_CHECKPOINTS_DIR = "checkpoints"
RUN_FINAL_MODEL_DIR = "final_model"
RUN_ADAPTERS_DIR = "adapters"


@dataclasses.dataclass
class LoadedModel:
  config: LlamaConfig
  model: Llama
  params: Any
  tokenizer: Tokenizer | None
  mesh: Mesh
  rules: partitioning.LogicalRules


def is_orbax_model_dir(model_dir: str) -> bool:
  return (epath.Path(model_dir) / checkpointing.PARAMS_DIR).is_dir()


def load_model(model_dir: str, mesh: Mesh, rules: partitioning.LogicalRules | None = None,
               with_tokenizer: bool = True, adapters: str | None = None,
               verify_checksums: bool = True, **runtime: Any) -> LoadedModel:
  """Reads ``config.json``, the weights and the tokenizer of ``model_dir``.

  ``runtime`` overrides how the model runs (``dtype``, ``param_dtype``, ``scan_layers``,
  ``attention_impl``, ``remat_policy``); ``param_dtype`` defaults to the stored dtype. ``adapters`` (a
  LoRA adapter folder trained on this model) adds unmerged adapters: ``model`` then carries the LoRA
  config and ``params`` both the base and the adapters. Parameters (and adapters) of Orbax folders
  are checked against their recorded checksums unless ``verify_checksums`` is False (a damaged
  folder raises ``checkpointing.CheckpointCorrupted``).
  """
  rules = partitioning.logical_axis_rules() if rules is None else rules
  config, tokenizer = _config_and_tokenizer(model_dir, with_tokenizer, runtime)
  model = Llama(config, lora=None if adapters is None else lora.LoraConfig.load_json(adapters))
  boxed, boxed_adapters = lora.split(partitioning.abstract_params(model))
  abstract, shardings = partitioning.unbox(boxed), partitioning.logical_shardings(boxed, mesh, rules)
  if is_orbax_model_dir(model_dir):
    params = checkpointing.load_params(os.path.join(model_dir, checkpointing.PARAMS_DIR), abstract,
                                       shardings, verify_checksums)
  else:
    logging.info("%s: Hugging Face weights carry no checksums; read as stored", model_dir)
    params = _load_hf_params(model_dir, config, abstract, shardings)
  if adapters is not None:
    params = lora.join(params, checkpointing.load_params(
        os.path.join(adapters, checkpointing.PARAMS_DIR), partitioning.unbox(boxed_adapters),
        partitioning.logical_shardings(boxed_adapters, mesh, rules), verify_checksums))
  return LoadedModel(config, model, params, tokenizer, mesh, rules)


def _config_and_tokenizer(model_dir: str, with_tokenizer: bool, runtime: dict[str, Any]
                          ) -> tuple[LlamaConfig, Tokenizer | None]:
  """``model_dir``'s config (with the ``runtime`` overrides) and tokenizer, checked to fit."""
  config = LlamaConfig.load_hf_json(model_dir).replace(**runtime)
  tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
  if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{tokenizer.source} has {tokenizer.vocab_size} ids but {model_dir}'s "
                     f"config.json has vocab_size {config.vocab_size}: ids past it have no "
                     "embedding row")
  return config, tokenizer


def run_checkpoint_steps(run_dir: str) -> list[int]:
  """The steps of a run's complete checkpoints, in order (Orbax renames a step's folder to its
  number only once every item is written)."""
  directory = epath.Path(run_dir) / RUN_CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def load_run_checkpoint(run_dir: str, step: int, mesh: Mesh,
                        rules: partitioning.LogicalRules | None = None,
                        model_dir: str | None = None, with_tokenizer: bool = True,
                        verify_checksums: bool = True, **runtime: Any) -> LoadedModel:
  """The trained parameters of ``run_dir/checkpoints/<step>/`` as a model (as ``load_model``).

  A run checkpoint holds the train state but no ``config.json`` or tokenizer: those come from
  ``model_dir``, by default the run's ``final_model`` (a run still training: name its init
  checkpoint). A LoRA run's checkpoint holds adapters: they run unmerged on the base model its
  ``adapters/lora_config.json`` names (``model_dir`` overrides it), with that folder's LoRA
  settings. The parameters are read in the layout they were trained in (stacked or per layer), and
  checked against the checksums saved with the step unless ``verify_checksums`` is False.
  """
  rules = partitioning.logical_axis_rules() if rules is None else rules
  step_dir = os.path.join(storage.absolute(run_dir), RUN_CHECKPOINTS_DIR, str(step))
  if step not in run_checkpoint_steps(run_dir):
    raise FileNotFoundError(f"{step_dir}: no complete checkpoint of step {step} (complete: "
                            f"{run_checkpoint_steps(run_dir)})")
  with checkpointing.reading(step_dir):
    stored = ocp_v1.metadata(step_dir, checkpointable_name="state").metadata
  trained = checkpointing.flatten(stored["params"])
  runtime["scan_layers"] = checkpointing.checkpoint_layout(trained) == "stacked"
  adapters_dir = os.path.join(run_dir, RUN_ADAPTERS_DIR)
  lora_config = (lora.LoraConfig.load_json(adapters_dir)
                 if any(lora.is_adapter(path) for path in trained) else None)
  if lora_config is None:
    config, tokenizer = _config_and_tokenizer(_run_model_dir(run_dir, model_dir), with_tokenizer,
                                              runtime)
    base = None
  else:
    base_loaded = load_model(model_dir or lora.recorded_base_model(adapters_dir), mesh, rules,
                             with_tokenizer, verify_checksums=verify_checksums, **runtime)
    config, tokenizer, base = base_loaded.config, base_loaded.tokenizer, base_loaded.params
  model = Llama(config, lora=lora_config)
  whole, adapters = lora.split(partitioning.abstract_params(model))
  boxed = whole if base is None else adapters
  params = _restore_trained(step_dir, stored, partitioning.unbox(boxed),
                            partitioning.logical_shardings(boxed, mesh, rules), verify_checksums)
  return LoadedModel(config, model, params if base is None else lora.join(base, params), tokenizer,
                     mesh, rules)


def _run_model_dir(run_dir: str, model_dir: str | None) -> str:
  """Where a run's config.json and tokenizer are read: ``model_dir``, else its final model."""
  model_dir = model_dir or os.path.join(run_dir, RUN_FINAL_MODEL_DIR)
  if not (epath.Path(model_dir) / "config.json").exists():
    raise FileNotFoundError(f"{model_dir}: no config.json; a run that has not finished has no "
                            "final_model: name a model folder with its config and tokenizer "
                            "(its init checkpoint)")
  return model_dir


def _restore_trained(step_dir: str, stored: Any, abstract: Any, shardings: Any,
                     verify_checksums: bool) -> Any:
  """The ``params`` of a step's train state, on ``shardings``: read in their stored dtypes (the
  optimizer state is not read), checked against the step's checksums, cast to ``abstract``'s."""
  flat_abstract, flat_shardings = checkpointing.flatten(abstract), checkpointing.flatten(shardings)
  stored_params = checkpointing.flatten(stored["params"])
  if set(stored_params) != set(flat_abstract):
    raise ValueError(f"{step_dir}: the trained tensors do not match the model's (a model_dir of "
                     "another architecture?)")
  target = jax.tree.map(lambda _: ocp_v1.PLACEHOLDER, stored)
  target["params"] = checkpointing.nest({
      path: jax.ShapeDtypeStruct(spec.shape, stored_params[path].dtype,
                                 sharding=flat_shardings[path])
      for path, spec in flat_abstract.items()})
  with checkpointing.reading(step_dir):
    params = ocp_v1.load(step_dir, target, checkpointable_name="state")["params"]
  if verify_checksums:
    meta = json.loads((epath.Path(step_dir) / "meta" / "metadata").read_text())
    recorded = checkpointing.checksums_from_json(meta.get(checkpoints_lib.CHECKSUMS_KEY),
                                                 f"{step_dir}/meta")
    if recorded is not None:
      checkpointing.check_tensors(step_dir, {"params/" + "/".join(path): array for path, array
                                             in checkpointing.flatten(params).items()}, recorded)
  return jax.tree.map(checkpointing.cast_to, params, checkpointing.nest(flat_abstract))


def _write_folder(directory: str, params: Any, write_files: Callable[[str], None]) -> str:
  """``params/`` (with its checksums) plus what ``write_files`` puts beside it, written under
  ``directory.tmp`` and renamed into place (replacing any earlier folder) once complete. Every host
  calls this together."""
  staging = directory + ".tmp"
  if jax.process_index() == 0 and epath.Path(staging).exists():
    epath.Path(staging).rmtree()
  multihost_utils.sync_global_devices("folder staging")
  checkpointing.save_params(os.path.join(staging, checkpointing.PARAMS_DIR), params)
  if jax.process_index() == 0:
    write_files(staging)
    if epath.Path(directory).exists():
      epath.Path(directory).rmtree()
    epath.Path(staging).rename(directory)
  multihost_utils.sync_global_devices("folder written")
  return directory


def save_model(directory: str, params: Any, config: LlamaConfig, tokenizer_dir: str | None) -> str:
  """A model folder: ``params/`` + ``config.json`` (+ the tokenizer files of ``tokenizer_dir``), what
  the converters, generation and ``load_model`` read."""

  def write_files(staging: str) -> None:
    config.save_hf_json(staging)
    if tokenizer_dir:
      tokenizer_lib.copy_tokenizer_files(tokenizer_dir, staging)

  return _write_folder(directory, params, write_files)


def save_adapters(directory: str, adapters: Any, config: lora.LoraConfig,
                  base_model: str | None) -> str:
  """An adapter folder: ``params/`` (the adapters alone) + ``lora_config.json`` naming ``base_model``."""
  if base_model is not None:
    base_model = storage.absolute(base_model)
  return _write_folder(directory, adapters, lambda staging: config.save_json(staging, base_model))


def merge_lora(base_dir: str | None, adapters_dir: str, out_dir: str, mesh: Mesh,
               param_dtype: str | None = None, verify_checksums: bool = True) -> str:
  """Writes the model folder of ``base + scale * A @ B`` (``out_dir`` must not exist).

  ``base_dir`` defaults to the base model the adapters record; ``param_dtype`` (default: the base's
  stored dtype) is the dtype the base is read in and the merged weights written in;
  ``verify_checksums`` as for ``load_model``.
  """
  out_dir = storage.absolute(out_dir)
  if epath.Path(out_dir).exists():
    raise FileExistsError(f"{out_dir}: already exists; choose a new output folder or delete it")
  base_dir = base_dir or lora.recorded_base_model(adapters_dir)
  if base_dir is None:
    raise ValueError(f"{adapters_dir}: records no base model; name one")
  runtime = {} if param_dtype is None else {"param_dtype": param_dtype}
  loaded = load_model(base_dir, mesh, with_tokenizer=False, adapters=adapters_dir,
                      verify_checksums=verify_checksums, **runtime)
  base, adapters = lora.split(loaded.params)
  merged = lora.merge_sharded(base, adapters, loaded.model.lora)
  save_model(out_dir, merged, loaded.config, base_dir)
  logging.info("merged %s into %s: %s", adapters_dir, base_dir, out_dir)
  return out_dir


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
