"""The training loop shared by continual pre-training and instruction tuning (``medllama-train``).

One gin-configured entry point, ``train``: it builds the mesh, the model and the optimizer from gin,
streams batches of a seqio task or mixture, and runs the sharded train step until ``total_steps``.

* Start: resume the run's latest complete checkpoint if there is one (parameters, optimizer, step and
  data position: the run continues exactly where it stopped); otherwise take the parameters of
  ``init_checkpoint`` (a model folder from ``medllama-convert``, or a Hugging Face folder) with a fresh
  optimizer, or random parameters.
* Every ``log_every`` steps: loss, perplexity, learning rate, gradient norm, tokens/s, step time and
  MFU (accelerators with a known peak) go to the log, to TensorBoard (``run_dir/tensorboard``) and to
  ``run_dir/metrics.jsonl``; every ``eval_every`` steps the loss on a held-out split, and with
  ``task_eval`` (``task_eval.py``) MIBE tasks run on the parameters in memory every N steps.
* A step whose loss, gradient or updated parameters are not finite never changes the state (see
  ``step.py``): the run stops with an error naming the step (``on_non_finite="stop"``) or skips that
  batch (``"skip"``), so a NaN never reaches a checkpoint.
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from medllama_jax import loading, lora as lora_lib, partitioning, progress
from medllama_jax.config import RUNTIME_FIELDS, LlamaConfig, model_config
from medllama_jax.data import pipeline
from medllama_jax.lora import LoraConfig
from medllama_jax.model import Llama
from medllama_jax.tokenizer import load_tokenizer
from medllama_jax.train import checkpoints, optimizer as optim, step as train_step, throughput
from medllama_jax.train.task_eval import TaskEvaluation

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


def _initial_params(model: Llama, init_checkpoint: str | None, mesh, rules, seed: int,
                    verify_checksums: bool) -> Any:
  """Parameters of ``init_checkpoint`` (its architecture must equal the configured one), or random."""
  cfg = model.config
  if init_checkpoint is None:
    logging.info("no init_checkpoint: random parameters (seed %d)", seed)
    return partitioning.init_params(model, mesh, rules, jax.random.key(seed))
  runtime = {name: getattr(cfg, name) for name in RUNTIME_FIELDS}
  loaded = loading.load_model(init_checkpoint, mesh, rules, with_tokenizer=False,
                              verify_checksums=verify_checksums, **runtime)
  mismatched = [n for n in ARCHITECTURE_FIELDS if getattr(loaded.config, n) != getattr(cfg, n)]
  if mismatched:
    details = ", ".join(f"{n}: checkpoint {getattr(loaded.config, n)!r} vs configured "
                        f"{getattr(cfg, n)!r}" for n in mismatched)
    raise ValueError(f"{init_checkpoint}/config.json does not match the model config ({details})")
  logging.info("parameters from %s (fresh optimizer)", init_checkpoint)
  return loaded.params


def _drop_records_after(path: epath.Path, step: int) -> None:
  """Rewrites ``metrics.jsonl`` (atomically) without the records of steps after ``step``.

  A resumed run redoes the steps between its checkpoint and the interruption and logs them again;
  without this they would appear twice. A line cut short by the interruption is dropped too.
  """
  if not path.exists():
    return
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      keep = json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    if keep:
      kept.append(line + "\n")
    else:
      dropped += 1
  if dropped:
    staging = path.parent / f"{path.name}.rewrite"
    staging.write_text("".join(kept))
    staging.replace(path)
    logging.info("%s: %d records past step %d dropped (they are redone from the checkpoint)",
                 path, dropped, step)


def _drop_events_after(tensorboard_dir: str, step: int) -> None:
  """Rewrites (atomically) the TensorBoard event files without the summaries of steps after ``step``.

  The same reason as :func:`_drop_records_after`: TensorBoard would otherwise show the redone steps
  twice, out of order. A record cut short by the interruption ends its file's reading.
  """
  import tensorflow as tf  # Already loaded by the TensorBoard writer; only this function needs it.

  for path in tf.io.gfile.glob(os.path.join(tensorboard_dir, "events.out.tfevents.*")):
    kept, dropped = [], 0
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        if event.HasField("summary") and event.step > step:
          dropped += 1
        else:
          kept.append(record.numpy())
    except tf.errors.DataLossError:
      dropped += 1
    if not dropped:
      continue
    staging = f"{path}.rewrite"
    with tf.io.TFRecordWriter(staging) as writer:
      for record in kept:
        writer.write(record)
    tf.io.gfile.rename(staging, path, overwrite=True)
    logging.info("%s: %d events past step %d dropped (they are redone from the checkpoint)",
                 path, dropped, step)


class _MetricsLog:
  """Averages step metrics between logs and writes them to the log, TensorBoard and JSON lines."""

  def __init__(self, run_dir: str, config: LlamaConfig, sequence_length: int, total_steps: int,
               schedule, num_devices: int, start_step: int):
    self._primary = jax.process_index() == 0
    tensorboard_dir = os.path.join(run_dir, "tensorboard")
    jsonl = epath.Path(run_dir, "metrics.jsonl")
    if self._primary:
      _drop_records_after(jsonl, start_step)
      _drop_events_after(tensorboard_dir, start_step)
    self._writer = metric_writers.create_default_writer(
        tensorboard_dir, just_logging=not self._primary, asynchronous=False)
    self._jsonl = jsonl.open("a") if self._primary else None
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
                 "ETA %s", step, self._total, 100.0 * step / self._total, out["loss"],
                 out["perplexity"], out["learning_rate"], out["grad_norm"], out["tokens_per_s"],
                 f" MFU {100 * utilisation:.1f}%" if utilisation is not None else "",
                 progress.format_duration(remaining))
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


@dataclasses.dataclass(frozen=True)
class _Run:
  """What ``_setup`` builds from gin for one run: the mesh, the model and optimizer, the data
  stream, the checkpoints, and the frozen LoRA base (``None`` when the whole model trains)."""
  run_dir: str
  mesh: Mesh
  rules: partitioning.LogicalRules
  config: LlamaConfig
  export_config: LlamaConfig
  model: Llama
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: train_step.TrainState
  data: pipeline.DataIterator
  ckpts: checkpoints.RunCheckpoints
  frozen: Any | None
  verify_checksums: bool


# A periodic evaluation: ``(step, trained params) -> None``, writing its own results and scalars.
Evaluation = Callable[[int, Any], None]


def _setup(run_dir: str, mixture: str, sequence_length: int, global_batch_size: int,
           total_steps: int, seed: int, init_checkpoint: str | None, lora: LoraConfig | None,
           save_every: int, keep_checkpoints: int, async_checkpoints: bool,
           verify_checksums: bool) -> _Run:
  epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    epath.Path(run_dir, "config.gin").write_text(gin.config_str())
  mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
  config = model_config()
  model = Llama(config, lora=lora)
  tx, schedule = optim.make_optimizer(total_steps=total_steps)
  data = pipeline.make_data_iterator(mixture, sequence_length, global_batch_size, split="train",
                                     seed=seed)
  ckpts = checkpoints.RunCheckpoints(os.path.join(run_dir, "checkpoints"), save_every,
                                     keep_checkpoints, async_checkpoints)
  # The frozen LoRA base is never part of a run checkpoint: every start reads it again.
  frozen = None if lora is None else _initial_params(Llama(config), init_checkpoint, mesh, rules,
                                                      seed, verify_checksums)
  return _Run(run_dir, mesh, rules, config, _export_config(config, init_checkpoint), model, tx,
              schedule, train_step.train_state_shardings(model, tx, mesh, rules), data, ckpts,
              frozen, verify_checksums)


def _start(run: _Run, init_checkpoint: str | None, seed: int) -> tuple[train_step.TrainState, int]:
  """The state to train from, and how many steps were skipped so far: the latest complete
  checkpoint's, or fresh (``init_checkpoint``'s or random parameters; fresh LoRA adapters)."""
  latest = run.ckpts.latest_step()
  if latest is not None:
    with progress.stage(f"resuming at step {latest} from {run.ckpts.directory}"):
      abstract_state = partitioning.placed(
          partitioning.unbox(train_step.abstract_train_state(run.model, run.tx)),
          run.state_shardings)
      state, meta = run.ckpts.restore(latest, abstract_state, run.data,
                                      verify_checksums=run.verify_checksums)
    return state, int(meta.get("skipped_steps", 0))
  with progress.stage("initialising the train state"):
    if run.frozen is None:
      params = _initial_params(run.model, init_checkpoint, run.mesh, run.rules, seed,
                               run.verify_checksums)
    else:
      params = lora_lib.init_adapters(run.model, run.mesh, run.rules, jax.random.key(seed))
    return train_step.init_train_state(params, run.tx, run.state_shardings), 0


def _loss_evaluation(run: _Run, log: _MetricsLog, mixture: str, sequence_length: int,
                     global_batch_size: int, split: str, seed: int, num_batches: int) -> Evaluation:
  """The loss and perplexity on the first ``num_batches`` of ``split``, as scalars ``eval/*``."""
  eval_fn = _make_eval_fn(run.model, run.state_shardings, run.mesh, run.rules, run.frozen)

  def evaluate(step: int, params: Any) -> None:
    data = pipeline.make_data_iterator(mixture, sequence_length, global_batch_size, split=split,
                                       seed=seed, shuffle=False)
    evaluated = _evaluate(eval_fn, params, data, num_batches, run.mesh, run.rules)
    log.write(step, evaluated, "eval")
    logging.info("step %d eval loss %.4f ppl %.2f", step, evaluated["loss"],
                 evaluated["perplexity"])

  return evaluate


def _task_evaluation(run: _Run, log: _MetricsLog, task_eval: TaskEvaluation,
                     tokenizer_source: str | None) -> Evaluation:
  """``task_eval`` on the parameters in memory (LoRA: adapters unmerged on the frozen base), with
  the config and tokenizer the final model folder gets, as scalars ``task_eval/*``."""
  model = Llama(run.export_config, lora=run.model.lora)
  tokenizer = None  # MIBE tasks bring their own vocabulary; harness tasks need the model's
  if task_eval.harness_tasks and task_eval.harness_tokenizer is None:
    if tokenizer_source is None:
      raise ValueError("TaskEvaluation.harness_tasks need a tokenizer: the run has no "
                       "init_checkpoint or tokenizer_dir; bind TaskEvaluation.harness_tokenizer")
    tokenizer = load_tokenizer(tokenizer_source)

  def evaluate(step: int, params: Any) -> None:
    loaded = loading.LoadedModel(run.export_config, model,
                                 train_step.model_params(params, run.frozen), tokenizer, run.mesh,
                                 run.rules)
    log.write(step, task_eval.run(loaded, run.run_dir, step), "task_eval")

  return evaluate


def _step_loop(run: _Run, step_fn, state: train_step.TrainState, skipped: int, log: _MetricsLog,
               evaluations: Sequence[tuple[int, Evaluation]], *,
               total_steps: int, log_every: int, batch_tokens: int, on_non_finite: str,
               max_consecutive_skips: int, meta: dict[str, Any], sigterm: "_SigtermFlag"
               ) -> tuple[train_step.TrainState, int, bool, dict[str, float]]:
  """Trains until ``total_steps`` or a termination signal (``sigterm``); returns the state, its
  step, whether a signal stopped the run, and the last logged training metrics. ``evaluations``:
  (every N steps, evaluation) pairs, also run at the last step; their time is left out of the
  step-time figures."""
  step = int(state.step)
  last: dict[str, float] = {}
  wrote_config = False
  consecutive_skips = 0
  if step < total_steps:
    logging.info("training steps %d to %d (the first one compiles the step: it takes longer)",
                 step + 1, total_steps)
  while step < total_steps:
    state, metrics = step_fn(state, pipeline.global_batch(next(run.data), run.mesh, run.rules))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not metrics["finite"]:
      message = (f"step {step + 1}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']} "
                 "or the updated parameters are not finite")
      if on_non_finite == "stop":
        raise NonFiniteLossError(f"{message}; the state was not updated and no checkpoint "
                                 f"holds it (latest: {run.ckpts.latest_step()})")
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
      epath.Path(run.run_dir, "operative_config.gin").write_text(gin.operative_config_str())
      wrote_config = True
    if step % log_every == 0 or step == total_steps:
      last = log.flush(step, skipped)
    for every, evaluate in evaluations:
      if step % every == 0 or step == total_steps:
        started = time.perf_counter()
        evaluate(step, state.params)
        log.exclude(time.perf_counter() - started)
    stop = _any_process(sigterm.received) or run.ckpts.reached_preemption(step)
    run.ckpts.save(step, state, run.data, {"skipped_steps": skipped, **meta},
                   force=stop or step == total_steps)
    if stop:
      logging.warning("stopping at step %d after a termination signal", step)
      return state, step, True, last
  return state, step, False, last


def _export(run: _Run, params: Any, lora: LoraConfig | None, init_checkpoint: str | None,
            tokenizer_dir: str | None) -> tuple[str, str | None]:
  """Writes ``final_model`` (LoRA: merged, after the ``adapters`` folder); returns both folders."""
  adapters_dir = None
  if lora is not None:
    adapters_dir = loading.save_adapters(os.path.join(run.run_dir, "adapters"), params, lora,
                                         init_checkpoint)
    logging.info("adapter folder: %s", adapters_dir)
    params = lora_lib.merge_sharded(run.frozen, params, lora)
  final_dir = loading.save_model(os.path.join(run.run_dir, "final_model"), params,
                                 run.export_config, tokenizer_dir or init_checkpoint)
  logging.info("final model folder: %s", final_dir)
  return final_dir, adapters_dir


@gin.configurable
def train(run_dir: str = gin.REQUIRED, mixture: str = gin.REQUIRED, sequence_length: int = 4096,
          global_batch_size: int = 8, total_steps: int = 1000, num_microbatches: int = 1,
          init_checkpoint: str | None = None, tokenizer_dir: str | None = None, seed: int = 0,
          save_every: int = 1000, keep_checkpoints: int = 3, async_checkpoints: bool = True,
          log_every: int = 10, eval_every: int = 0, eval_batches: int = 10,
          eval_split: str = "validation", on_non_finite: str = "stop",
          max_consecutive_skips: int = 20, z_loss: float = 0.0,
          lora: LoraConfig | None = None, task_eval: TaskEvaluation | None = None,
          verify_checksums: bool = True) -> TrainResult:
  """Trains the gin-configured model on ``mixture`` (a registered seqio task or mixture name).

  ``global_batch_size`` rows of ``sequence_length`` tokens per step, accumulated over
  ``num_microbatches``. With ``on_non_finite="skip"``, more than ``max_consecutive_skips``
  non-finite steps in a row stop the run all the same. ``tokenizer_dir`` (default:
  ``init_checkpoint``) supplies the tokenizer files copied into the final model folder. The gin
  bindings in force are written to ``run_dir/config.gin`` at the start, the operative ones (every
  value actually used) to ``run_dir/operative_config.gin`` after the first step. ``lora`` trains
  LoRA adapters of ``init_checkpoint`` (then required) instead of the whole model. ``task_eval``
  runs seqio Tasks (MIBE) on the model in memory every ``task_eval.every`` steps and at the end.
  ``verify_checksums=False`` skips the check of restored checkpoints and ``init_checkpoint``
  against their recorded checksums.
  """
  if on_non_finite not in NON_FINITE_POLICIES:
    raise ValueError(f"on_non_finite={on_non_finite!r} is not one of {NON_FINITE_POLICIES}")
  if lora is not None and init_checkpoint is None:
    raise ValueError("LoRA training needs init_checkpoint: the base model the adapters adapt")
  with progress.stage(f"setting up the run in {run_dir} (mesh, model, data pipeline)"):
    run = _setup(run_dir, mixture, sequence_length, global_batch_size, total_steps, seed,
                 init_checkpoint, lora, save_every, keep_checkpoints, async_checkpoints,
                 verify_checksums)
  state, skipped = _start(run, init_checkpoint, seed)
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(run.model, run.tx, num_microbatches, z_loss, dropout_seed=seed),
      run.state_shardings, run.mesh, run.rules, run.frozen)
  log = _MetricsLog(run_dir, run.config, sequence_length, total_steps, run.schedule,
                    run.mesh.devices.size, start_step=int(state.step))
  evaluations: list[tuple[int, Evaluation]] = []
  if eval_every:
    evaluations.append((eval_every, _loss_evaluation(run, log, mixture, sequence_length,
                                                     global_batch_size, eval_split, seed,
                                                     eval_batches)))
  if task_eval is not None:
    evaluations.append((task_eval.every, _task_evaluation(run, log, task_eval,
                                                          tokenizer_dir or init_checkpoint)))
  meta = {"mixture": mixture, "seed": seed, "sequence_length": sequence_length,
          "global_batch_size": global_batch_size}
  # The handler stays until the last checkpoint is complete: a second SIGTERM must not kill the
  # process while it is being written.
  with _SigtermFlag() as sigterm:
    try:
      state, step, stopped_by_signal, last = _step_loop(
          run, step_fn, state, skipped, log, evaluations, total_steps=total_steps,
          log_every=log_every, batch_tokens=global_batch_size * sequence_length,
          on_non_finite=on_non_finite, max_consecutive_skips=max_consecutive_skips, meta=meta,
          sigterm=sigterm)
    finally:
      try:
        run.ckpts.close()
      finally:
        log.close()
  final_dir = adapters_dir = None
  if step == total_steps:
    with progress.stage(f"writing the final model folder in {run_dir}"):
      final_dir, adapters_dir = _export(run, state.params, lora, init_checkpoint, tokenizer_dir)
  return TrainResult(step=step, final_model_dir=final_dir, stopped_by_signal=stopped_by_signal,
                     last_metrics=last, adapters_dir=adapters_dir)
