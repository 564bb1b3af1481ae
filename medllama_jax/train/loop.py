"""The training loop shared by continual pre-training and instruction tuning (``medllama-train``).

One gin-configured entry point, ``train``: it builds the mesh, the model and the optimizer from gin,
streams batches of a seqio task or mixture, and runs the sharded train step until ``total_steps``.

* Start: resume the run's latest complete checkpoint if there is one (parameters, optimizer, step and
  data position: the run continues exactly where it stopped); otherwise take the parameters of
  ``init_checkpoint`` (a model folder from ``medllama-convert``, or a Hugging Face folder) with a fresh
  optimizer, or random parameters.
* Every ``log_every`` steps: loss, perplexity, learning rate, gradient norm, tokens/s, step time and
  MFU (accelerators with a known peak) go to the log, to TensorBoard (``run_dir/tensorboard``) and to
  ``run_dir/metrics.jsonl``; every ``eval_every`` steps the loss on a held-out split.
* A step whose loss or gradient is not finite never changes the state (see ``step.py``): the run stops
  with an error naming the step (``on_non_finite="stop"``) or skips that batch (``"skip"``), so a NaN
  never reaches a checkpoint.
* SIGTERM (TPU maintenance, preemption) saves the current step and returns cleanly.
* At the end the parameters are written as a model folder (``run_dir/final_model``: Orbax ``params/``,
  ``config.json``, tokenizer files) that ``medllama-convert orbax-to-hf`` exports and
  ``medllama-generate`` loads.
* LoRA (``train.lora = @LoraConfig()``) trains adapters of the frozen ``init_checkpoint``: the run's
  checkpoints hold the adapters, their optimizer state, the step and the data position, and the base
  is read from ``init_checkpoint`` again at every start. The run ends with the adapter folder
  (``run_dir/adapters``, see ``loading.save_adapters``) and ``final_model`` with the adapters merged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from medllama_jax import loading, lora as lora_lib, partitioning
from medllama_jax.config import RUNTIME_FIELDS, LlamaConfig, model_config
from medllama_jax.data import pipeline
from medllama_jax.lora import LoraConfig
from medllama_jax.model import Llama
from medllama_jax.train import checkpoints, optimizer as optim, step as train_step, throughput

NON_FINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient of a step was NaN/Inf; the state and checkpoints were left untouched."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
  step: int
  final_model_dir: str | None
  stopped_by_signal: bool
  last_metrics: dict[str, float]
  adapters_dir: str | None = None


class _SigtermFlag:
  """Remembers a SIGTERM instead of dying, so the loop can save the current step first."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self) -> "_SigtermFlag":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
    self.received = True

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# What must agree between the configured model and an init checkpoint: everything the weights' shapes
# and the forward pass depend on (token ids and the context length do not).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "resolved_head_dim", "rms_norm_eps", "rope_theta",
                       "rope_scaling", "tie_word_embeddings")


def _export_config(config: LlamaConfig, init_checkpoint: str | None) -> LlamaConfig:
  """The config written with the trained model: the init checkpoint's (its token ids carry over)."""
  if init_checkpoint is None:
    return config
  return LlamaConfig.load_hf_json(init_checkpoint).replace(
      **{name: getattr(config, name) for name in RUNTIME_FIELDS})


def _initial_params(model: Llama, init_checkpoint: str | None, mesh, rules, seed: int) -> Any:
  """Parameters of ``init_checkpoint`` (its architecture must equal the configured one), or random."""
  cfg = model.config
  if init_checkpoint is None:
    logging.info("no init_checkpoint: random parameters (seed %d)", seed)
    return partitioning.init_params(model, mesh, rules, jax.random.key(seed))
  runtime = {name: getattr(cfg, name) for name in RUNTIME_FIELDS}
  loaded = loading.load_model(init_checkpoint, mesh, rules, with_tokenizer=False, **runtime)
  mismatched = [n for n in ARCHITECTURE_FIELDS if getattr(loaded.config, n) != getattr(cfg, n)]
  if mismatched:
    details = ", ".join(f"{n}: checkpoint {getattr(loaded.config, n)!r} vs configured "
                        f"{getattr(cfg, n)!r}" for n in mismatched)
    raise ValueError(f"{init_checkpoint}/config.json does not match the model config ({details})")
  logging.info("parameters from %s (fresh optimizer)", init_checkpoint)
  return loaded.params


class _MetricsLog:
  """Averages step metrics between logs and writes them to the log, TensorBoard and JSON lines."""

  def __init__(self, run_dir: str, config: LlamaConfig, sequence_length: int, total_steps: int,
               schedule, num_devices: int):
    self._primary = jax.process_index() == 0
    self._writer = metric_writers.create_default_writer(
        os.path.join(run_dir, "tensorboard"), just_logging=not self._primary, asynchronous=False)
    self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a") if self._primary else None
    self._config, self._length, self._total = config, sequence_length, total_steps
    self._schedule, self._devices = schedule, num_devices
    self._peak = throughput.peak_flops_per_device()
    self._sums: dict[str, float] = {}
    self._count = 0
    self._tokens = 0.0
    self._batch_tokens = 0
    self._start = time.perf_counter()
    self._run_start = self._start

  def add(self, metrics: dict[str, float], batch_tokens: int) -> None:
    for key in ("loss", "z_loss", "accuracy", "grad_norm"):
      self._sums[key] = self._sums.get(key, 0.0) + metrics[key]
    self._tokens += metrics["tokens"]
    self._batch_tokens += batch_tokens
    self._count += 1

  def flush(self, step: int, skipped: int) -> dict[str, float]:
    if not self._count:
      return {}
    elapsed = time.perf_counter() - self._start
    out = {key: value / self._count for key, value in self._sums.items()}
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["learning_rate"] = float(self._schedule(step))
    out["step_time_s"] = elapsed / self._count
    out["tokens_per_s"] = self._tokens / elapsed
    out["batch_tokens_per_s"] = self._batch_tokens / elapsed
    out["skipped_steps"] = float(skipped)
    utilisation = throughput.mfu(self._config, self._length, out["batch_tokens_per_s"],
                                 self._devices, self._peak)
    if utilisation is not None:
      out["mfu"] = utilisation
    self.write(step, out, "train")
    remaining = (self._total - step) * out["step_time_s"]
    logging.info("step %d/%d (%.0f%%) loss %.4f ppl %.2f lr %.3g grad_norm %.3f %.0f tok/s%s, "
                 "ETA %.0f s", step, self._total, 100.0 * step / self._total, out["loss"],
                 out["perplexity"], out["learning_rate"], out["grad_norm"], out["tokens_per_s"],
                 f" MFU {100 * utilisation:.1f}%" if utilisation is not None else "", remaining)
    self._sums, self._count, self._tokens, self._batch_tokens = {}, 0, 0.0, 0
    self._start = time.perf_counter()
    return out

  def exclude(self, seconds: float) -> None:
    """Leaves time spent outside training steps (evaluation) out of the step-time figures."""
    self._start += seconds

  def write(self, step: int, values: dict[str, float], prefix: str) -> None:
    self._writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in values.items()})
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _make_eval_fn(model: Llama, state_shardings, mesh, rules, frozen: Any | None):
  """A jit'd ``(params, batch) -> (loss sum, weight sum)`` on the training shardings (``frozen``: the
  LoRA base, ``params`` being the adapters)."""
  frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)

  def eval_step(params, frozen, batch):
    with nn.logical_axis_rules(rules):
      logits, _ = model.apply({"params": train_step.model_params(params, frozen)},
                              batch["decoder_input_tokens"], batch["decoder_positions"],
                              batch["decoder_segment_ids"])
    sums = train_step.token_losses(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"])
    return sums["loss_sum"], sums["weight_sum"]

  jitted = jax.jit(eval_step, in_shardings=(state_shardings.params, frozen_shardings,
                                            train_step.batch_shardings(mesh, rules)))

  def run(params, batch):
    with partitioning.activate(mesh, rules):
      return jitted(params, frozen, batch)

  return run


def _evaluate(eval_fn, params, batches: Iterator[dict[str, np.ndarray]], num_batches: int, mesh,
              rules) -> dict[str, float]:
  loss_sum, weight_sum = 0.0, 0.0
  for _ in range(num_batches):
    loss, weight = eval_fn(params, pipeline.global_batch(next(batches), mesh, rules))
    loss_sum += float(loss)
    weight_sum += float(weight)
  loss = loss_sum / max(weight_sum, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": weight_sum}


@gin.configurable
def train(run_dir: str = gin.REQUIRED, mixture: str = gin.REQUIRED, sequence_length: int = 4096,
          global_batch_size: int = 8, total_steps: int = 1000, num_microbatches: int = 1,
          init_checkpoint: str | None = None, tokenizer_dir: str | None = None, seed: int = 0,
          save_every: int = 1000, keep_checkpoints: int = 3, async_checkpoints: bool = True,
          log_every: int = 10, eval_every: int = 0, eval_batches: int = 10,
          eval_split: str = "validation", on_non_finite: str = "stop",
          max_consecutive_skips: int = 20, z_loss: float = 0.0,
          lora: LoraConfig | None = None) -> TrainResult:
  """Trains the gin-configured model on ``mixture`` (a registered seqio task or mixture name).

  ``global_batch_size`` rows of ``sequence_length`` tokens per step, accumulated over
  ``num_microbatches``. With ``on_non_finite="skip"``, more than ``max_consecutive_skips``
  non-finite steps in a row stop the run all the same. ``tokenizer_dir`` (default:
  ``init_checkpoint``) supplies the tokenizer files copied into the final model folder. The gin bindings in force are written to
  ``run_dir/config.gin`` at the start, the operative ones (every value actually used) to
  ``run_dir/operative_config.gin`` after the first step. ``lora`` trains LoRA adapters of
  ``init_checkpoint`` (then required) instead of the whole model.
  """
  if on_non_finite not in NON_FINITE_POLICIES:
    raise ValueError(f"on_non_finite={on_non_finite!r} is not one of {NON_FINITE_POLICIES}")
  if lora is not None and init_checkpoint is None:
    raise ValueError("LoRA training needs init_checkpoint: the base model the adapters adapt")
  os.makedirs(run_dir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
  config = model_config()
  model = Llama(config, lora=lora)
  tx, schedule = optim.make_optimizer(total_steps=total_steps)
  state_shardings = train_step.train_state_shardings(model, tx, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      partitioning.unbox(train_step.abstract_train_state(model, tx)), state_shardings)
  data = pipeline.make_data_iterator(mixture, sequence_length, global_batch_size, split="train",
                                     seed=seed)
  ckpts = checkpoints.RunCheckpoints(os.path.join(run_dir, "checkpoints"), save_every,
                                     keep_checkpoints, async_checkpoints)
  # The frozen LoRA base is never part of a run checkpoint: every start reads it again.
  frozen = None if lora is None else _initial_params(Llama(config), init_checkpoint, mesh, rules,
                                                      seed)
  latest = ckpts.latest_step()
  if latest is not None:
    state, meta = ckpts.restore(latest, abstract_state, data)
    skipped = int(meta.get("skipped_steps", 0))
    logging.info("resuming at step %d", latest)
  else:
    if lora is None:
      params = _initial_params(model, init_checkpoint, mesh, rules, seed)
    else:
      params = lora_lib.init_adapters(model, mesh, rules, jax.random.key(seed))
    state = train_step.init_train_state(params, tx, state_shardings)
    skipped = 0
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(model, tx, num_microbatches, z_loss, dropout_seed=seed),
      state_shardings, mesh, rules, frozen)
  eval_fn = _make_eval_fn(model, state_shardings, mesh, rules, frozen) if eval_every else None
  log = _MetricsLog(run_dir, config, sequence_length, total_steps, schedule, mesh.devices.size)
  batch_tokens = global_batch_size * sequence_length
  step = int(state.step)
  last: dict[str, float] = {}
  stopped_by_signal = wrote_config = False
  consecutive_skips = 0
  meta_of = lambda: {"skipped_steps": skipped, "mixture": mixture, "seed": seed,
                     "sequence_length": sequence_length, "global_batch_size": global_batch_size}
  try:
    with _SigtermFlag() as sigterm:
      while step < total_steps:
        state, metrics = step_fn(state, pipeline.global_batch(next(data), mesh, rules))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not metrics["finite"]:
          message = (f"step {step + 1}: loss {metrics['loss']} / gradient norm "
                     f"{metrics['grad_norm']} is not finite")
          if on_non_finite == "stop":
            raise NonFiniteLossError(f"{message}; the state was not updated and no checkpoint "
                                     f"holds it (latest: {ckpts.latest_step()})")
          skipped += 1
          consecutive_skips += 1
          if consecutive_skips > max_consecutive_skips:
            raise NonFiniteLossError(f"{message}; {consecutive_skips} non-finite steps in a row")
          logging.warning("%s; batch skipped (%d so far)", message, skipped)
          continue
        consecutive_skips = 0
        step += 1
        log.add(metrics, batch_tokens)
        if not wrote_config and jax.process_index() == 0:
          with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())
          wrote_config = True
        if step % log_every == 0 or step == total_steps:
          last = log.flush(step, skipped)
        if eval_fn is not None and (step % eval_every == 0 or step == total_steps):
          eval_start = time.perf_counter()
          eval_data = pipeline.make_data_iterator(mixture, sequence_length, global_batch_size,
                                                  split=eval_split, seed=seed, shuffle=False)
          evaluated = _evaluate(eval_fn, state.params, eval_data, eval_batches, mesh, rules)
          log.write(step, evaluated, "eval")
          logging.info("step %d eval loss %.4f ppl %.2f", step, evaluated["loss"],
                       evaluated["perplexity"])
          log.exclude(time.perf_counter() - eval_start)
        stop = _any_process(sigterm.received) or ckpts.reached_preemption(step)
        ckpts.save(step, state, data, meta_of(), force=stop or step == total_steps)
        if stop:
          stopped_by_signal = True
          logging.warning("stopping at step %d after a termination signal", step)
          break
  finally:
    ckpts.close()
    log.close()
  final_dir = adapters_dir = None
  if step == total_steps:
    final_params = state.params
    if lora is not None:
      adapters_dir = loading.save_adapters(os.path.join(run_dir, "adapters"), state.params, lora,
                                           init_checkpoint)
      logging.info("adapter folder: %s", adapters_dir)
      final_params = lora_lib.merge_sharded(frozen, state.params, lora)
    final_dir = loading.save_model(os.path.join(run_dir, "final_model"), final_params,
                                   _export_config(config, init_checkpoint),
                                   tokenizer_dir or init_checkpoint)
    logging.info("final model folder: %s", final_dir)
  return TrainResult(step=step, final_model_dir=final_dir, stopped_by_signal=stopped_by_signal,
                     last_metrics=last, adapters_dir=adapters_dir)
