"""The JAX model as an lm-evaluation-harness model (``"medllama-jax"``), and ``run_harness``.

General-domain benchmarks (MMLU, ARC, HellaSwag, ...) run on the model as it is sharded over the
mesh, with no export to Hugging Face and no torch re-run. The three request types go through the
project's own decoding (``medllama_jax.decode``): ``loglikelihood`` and ``loglikelihood_rolling``
through ``decode.score`` (batched, left-padded teacher forcing), ``generate_until`` through
``decode.generate``.

The numbers are those of lm_eval's ``hf`` backend on the same weights (``tests/test_harness.py``):
contexts and continuations are encoded as ``TemplateLM`` and the ``hf`` backend encode them (the
tokenizer's own BOS, not added again to a text that already starts with it; an empty context is the
BOS alone, ``prefix_token_id``), sequences longer than ``max_length`` lose tokens from the left as
there, rolling windows are lm_eval's (``get_rolling_token_windows`` with a context of one token),
and generations are cut at the first stop string (the EOS text included) after at most
``max_gen_toks`` ids.

lm_eval is an optional dependency (``pip install -e ".[lm_eval]"``); this is the only module of the
package that imports it. Importing it registers the model, so that
``lm_eval.simple_evaluate(model="medllama-jax", model_args="model=DIR,...")`` finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import lm_eval
import lm_eval.tasks
from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

from medllama_jax import decode, loading, partitioning
from medllama_jax.tokenizer import Tokenizer, load_tokenizer

# Padded lengths are rounded up to a multiple of this, and every batch is padded to ``batch_size``
# rows, so that a whole benchmark compiles a handful of programs instead of one per length.
LENGTH_BUCKET = 64

DEFAULT_BATCH_SIZE = 8

# Arguments lm_eval adds to every model's (the devices are the mesh's here).
LM_EVAL_ARGS = frozenset({"device", "max_batch_size"})

# A scored pair: (context ids, continuation ids).
Pair = tuple[list[int], list[int]]


def load(model: str, mesh: str = "data=1,fsdp=-1,tensor=1", dtype: str = "float32",
         adapters: str | None = None, verify_checksums: bool = True, step: int | None = None,
         config_dir: str | None = None) -> loading.LoadedModel:
  """A model folder (Orbax or Hugging Face) or a training run's checkpoint, on a mesh given as
  ``--mesh`` is (``"2,2,2"``, ``"data=1,fsdp=-1,tensor=1"``; ``;`` may stand for ``,``, which lm_eval's
  ``model_args`` string takes as its own separator), computing and holding its weights in ``dtype``.

  A run folder (with ``checkpoints/``) is read at ``step`` (default: its latest complete checkpoint)
  by ``loading.load_run_checkpoint``, with the config and tokenizer of ``config_dir`` (default: the
  run's ``final_model``; a run still training needs its init checkpoint named).
  """
  device_mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(mesh.replace(";", ",")))
  runtime = {"dtype": dtype, "param_dtype": dtype}
  steps = [] if loading.is_orbax_model_dir(model) else loading.run_checkpoint_steps(model)
  if not steps:
    return loading.load_model(model, device_mesh, adapters=adapters,
                              verify_checksums=verify_checksums, **runtime)
  if adapters is not None:
    raise ValueError(f"{model} is a run folder: its checkpoints carry their own adapters")
  step = steps[-1] if step is None else int(step)
  logging.info("%s: checkpoint of step %d", model, step)
  return loading.load_run_checkpoint(model, step, device_mesh, model_dir=config_dir,
                                     verify_checksums=verify_checksums, **runtime)


@register_model("medllama-jax")
class MedllamaLM(TemplateLM):
  """A loaded model (``loading.LoadedModel``, or a folder that ``load`` reads) behind lm_eval's API.

  ``model``: an Orbax model folder, a Hugging Face folder, a training run's folder (``step`` and
  ``config_dir`` as for ``load``), or a ``LoadedModel`` already on its mesh (what the trainer holds;
  ``mesh``, ``dtype``, ``adapters`` are then not used). ``tokenizer``: a
  folder whose tokenizer to use when the model has none (a ``LoadedModel`` built without one).
  ``max_length`` defaults to the config's ``max_position_embeddings``, as the ``hf`` backend's does;
  ``add_bos_token`` and ``prefix_token_id`` mean what they mean there. ``batch_size`` rows are
  scored or generated per call (``"auto"`` is not supported: it stands for the default, 8).
  ``seed`` seeds sampled generations (greedy ones do not depend on it).
  """

  def __init__(self, model: str | loading.LoadedModel, mesh: str = "data=1,fsdp=-1,tensor=1",
               dtype: str = "float32", adapters: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
               max_length: int | None = None, max_gen_toks: int = 256,
               tokenizer: str | None = None, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, skip_checksums: bool = False,
               step: int | None = None, config_dir: str | None = None, seed: int = 0,
               **unused: Any) -> None:
    super().__init__()
    unknown = sorted(set(unused) - LM_EVAL_ARGS)
    if unknown:
      logging.warning("medllama-jax: unknown model arguments, not used: %s", unknown)
    if isinstance(model, str):
      model = load(model, mesh, dtype, adapters, not _as_bool(skip_checksums), step, config_dir)
    self.loaded = model
    self.tokenizer_impl = _tokenizer_of(model, tokenizer)
    self.batch_size_per_call = _batch_size(batch_size)
    self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
    self._max_gen_toks = int(max_gen_toks)
    self.add_bos_token = None if add_bos_token is None else _as_bool(add_bos_token)
    self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
    self.seed = int(seed)
    self.eos_ids = (tuple(model.config.eos_token_ids)
                    or ((self.tokenizer_impl.eos_id,) if self.tokenizer_impl.eos_id is not None
                        else ()))

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_impl.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context is, and what the first rolling window is conditioned on."""
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    bos = self.tokenizer_impl.bos_id
    return bos if bos is not None else self.eot_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """As the ``hf`` backend: the tokenizer's special tokens unless told otherwise, and none for a
    text that already starts with the prefix token's text (a BOS written into the prompt)."""
    tok = self.tokenizer_impl
    if add_special_tokens is None:
      add_special_tokens = self.add_bos_token
      if string.startswith(tok.decode([self.prefix_token_id], skip_special_tokens=False)):
        add_special_tokens = False
    if add_special_tokens is None:
      return tok.encode(string)
    return tok.encode(string, add_special_tokens=add_special_tokens)

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer_impl.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                            disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is greedy) per request, in order."""
    pairs = [self._truncated(context, continuation) for _, context, continuation in requests]
    results = self._score(pairs)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def _truncated(self, context: list[int], continuation: list[int]) -> Pair:
    """The last ``max_length + 1`` ids of context + continuation, as the ``hf`` backend keeps."""
    if not context or not continuation or len(continuation) > self.max_length:
      raise ValueError(f"medllama-jax: cannot score a context of {len(context)} ids and a "
                       f"continuation of {len(continuation)} (max_length {self.max_length})")
    whole = (context + continuation)[-(self.max_length + 1):]
    return whole[:-len(continuation)], continuation

  def _score(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
    """``decode.score`` over batches of similar lengths (longest first); results in input order."""
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), self.batch_size_per_call):
      indices = order[start:start + self.batch_size_per_call]
      batch = _filled([pairs[i] for i in indices], self.batch_size_per_call)
      scored = decode.score(self.loaded.model, self.loaded.params, batch, pad_id=0,
                            mesh=self.loaded.mesh, rules=self.loaded.rules, bucket=LENGTH_BUCKET)
      for i, result in zip(indices, scored):
        results[i] = result
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Sum of log p over each whole text, in disjoint windows of at most ``max_length`` ids."""
    windows, owners = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      ids = self.tok_encode(string)
      for window in lm_utils.get_rolling_token_windows(
          token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1):
        windows.append(lm_utils.make_disjoint_window(window))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._score(windows)):
      totals[owner] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, as a request's ``do_sample``/``temperature``/``top_k``/``top_p`` say)
    continuations, cut at the first stop string; requests are batched by their settings."""
    groups: dict[str, list[int]] = {}
    for index, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(index)
    texts: list[str | None] = [None] * len(requests)
    for indices in groups.values():
      contexts = [requests[i].args[0] for i in indices]
      for i, text in zip(indices, self._generate(contexts, requests[indices[0]].args[1])):
        texts[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return texts

  def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None),
                                  eos=self.tok_decode([self.eot_token_id], skip_special_tokens=False))
    max_new = kwargs.pop("max_gen_toks")
    max_context = self.max_length - max_new
    if max_context <= 0:
      raise ValueError(f"medllama-jax: max_gen_toks={max_new} leaves no room for a context in "
                       f"max_length={self.max_length}")
    sampling = decode.SamplingConfig(
        temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
        top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
        seed=self.seed, max_new_tokens=max_new)
    prompts = [self.tok_encode(c)[-max_context:] for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), self.batch_size_per_call):
      indices = order[start:start + self.batch_size_per_call]
      batch = _filled([prompts[i] for i in indices], self.batch_size_per_call)
      outputs = decode.generate(self.loaded.model, self.loaded.params, batch, sampling,
                                eos_ids=self.eos_ids, pad_id=0, mesh=self.loaded.mesh,
                                rules=self.loaded.rules, bucket=LENGTH_BUCKET)
      for i, ids in zip(indices, outputs):
        texts[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
    return texts

  def get_model_info(self) -> dict[str, Any]:
    config = self.loaded.config
    return {"model_num_parameters": sum(x.size for x in jax.tree.leaves(self.loaded.params)),
            "model_dtype": config.dtype, "max_position_embeddings": config.max_position_embeddings}


def _as_bool(value: Any) -> bool:
  """A flag from ``model_args`` (lm_eval passes ``"True"``/``"False"`` through as typed there)."""
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes")
  return bool(value)


def _batch_size(value: int | str) -> int:
  if isinstance(value, str) and value.startswith("auto"):
    logging.warning("medllama-jax: batch_size=%s is not supported; using %d", value,
                    DEFAULT_BATCH_SIZE)
    return DEFAULT_BATCH_SIZE
  return int(value)


def _tokenizer_of(model: loading.LoadedModel, tokenizer_dir: str | None) -> Tokenizer:
  if tokenizer_dir is not None:
    return load_tokenizer(tokenizer_dir)
  if model.tokenizer is None:
    raise ValueError("medllama-jax: the model was loaded without a tokenizer; pass tokenizer=DIR")
  return model.tokenizer


def _filled(rows: list, batch_size: int) -> list:
  """``rows`` repeated up to ``batch_size`` (the copies' results are dropped): one batch shape."""
  return rows + [rows[-1]] * (batch_size - len(rows))


def run_harness(lm: MedllamaLM, tasks: Sequence[str], include_path: str | None = None,
                num_fewshot: int | None = None, limit: int | None = None,
                seed: int = 0) -> dict[str, dict[str, float]]:
  """lm_eval's ``simple_evaluate`` of ``tasks`` on ``lm``: task → metric → value.

  Metrics are keyed as lm_eval names them without the filter (``acc``, ``acc_norm``,
  ``word_perplexity``, ``exact_match``); a metric computed under several filters keeps lm_eval's
  ``metric,filter`` key for the filters other than ``none``. Standard errors are kept under
  ``METRIC_stderr`` (left out where lm_eval has none, "N/A"). Groups appear as tasks with their
  aggregated metrics. ``include_path``: a folder of task YAML files beside lm_eval's own; ``seed``
  seeds lm_eval's random choices (few-shot samples; sampled generations use ``lm.seed``).
  Per-example samples are not kept.
  """
  results = lm_eval.simple_evaluate(
      model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=False,
      task_manager=lm_eval.tasks.TaskManager(include_path=include_path),
      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
  return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
  out = {}
  for key, value in values.items():
    if "," not in key or not isinstance(value, (int, float)):
      continue  # "alias" and other labels
    metric, filter_name = key.split(",", 1)
    out[metric if filter_name == "none" else key] = float(value)
  return out

