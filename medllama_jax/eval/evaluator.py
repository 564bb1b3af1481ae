"""Runs seqio evaluation Tasks (MIBE, MMLU) on a model folder and writes what the paper tabulates.

Per task: the ``test`` split from ``task.get_dataset`` (seqio does the reading, prompting and
tokenizing), our own batching (seqio.Evaluator is built around t5x's predict/score callbacks and
feature converters; calling ``decode`` directly is shorter and keeps one compiled program per batch
shape), then

* greedy generation with the KV cache, up to ``max_new_tokens`` (256, as the release), stopping at
  EOS and cut at the first of ``stop_sequences`` (none in the release); the text goes through the
  task's ``postprocess_fn`` to its ``predict_metric_fns``;
* for multiple-choice tasks (examples with an ``options`` feature), the log-likelihood of each
  option as the continuation of the prompt (``decode.score``), to its ``score_metric_fns`` (which
  take, per example, the list of option log-likelihoods).

Where the generated text comes from is a backend: :class:`LocalBackend` (the above, on a model in
memory) or :class:`ApiBackend` (a model behind an OpenAI-compatible endpoint, sent the prompt text;
``medllama_jax.eval.api``), through the same prompts, postprocessing and metric functions. An
endpoint returns text only, so option ranking is left out there and results.json says why.

Prompts longer than the model's context minus ``max_new_tokens`` keep BOS and their last tokens
(lm-evaluation-harness cuts contexts from the left too); how many were cut is reported. Examples
are batched longest first, so batch-mates have similar lengths; greedy rows do not depend on their
batch-mates, and the last batch is filled up with copies so that every batch has one shape.

Written to ``out_dir``: ``results.json`` (model, settings, each task's construction and metrics),
``results.md`` (the scores, a row per task and scoring; then per task its number of examples, of
truncated prompts, of shots and its seeds), TensorBoard scalars ``{task}/{metric}`` under
``tensorboard/``, and with ``write_predictions`` ``predictions/{task}.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import gin
import jax
import numpy as np
import seqio
from absl import logging
from clu import metric_writers
from etils import epath

from medllama_jax import chat, decode, loading, partitioning, progress
from medllama_jax.data.instruct import USER, Conversation, Turn
from medllama_jax.eval import api, paper
from medllama_jax.eval.settings import EvalSettings
from seqio_tasks import mibe

SPLIT = "test"
# Metric names whose values record how a score was computed (ROUGE's bootstrap seed), not a score:
# results.md lists them per task as integers, away from the score columns.
SETTING_METRICS = frozenset({"bootstrap_seed"})
# Scores on a task's console line.
_HEADLINE_SCORES = 4


@dataclasses.dataclass
class TaskResult:
  task: str
  metrics: dict[str, Any]
  predictions: list[dict[str, Any]]
  truncated_prompts: int
  # What results.json adds about how the task was run: the API endpoint and model, the metrics
  # not computed and why.
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
  """``text`` up to the earliest occurrence of any stop sequence."""
  cuts = [i for i in (text.find(stop) for stop in stop_sequences if stop) if i >= 0]
  return text[:min(cuts)] if cuts else text


def fit_prompt(ids: Sequence[int], max_length: int) -> list[int]:
  """``ids`` (BOS first) cut from the left to ``max_length`` tokens, BOS kept."""
  ids = list(ids)
  if len(ids) <= max_length:
    return ids
  return [ids[0], *ids[len(ids) - max_length + 1:]]


def _batches(items: Sequence[Any], size: int) -> Iterator[tuple[list[Any], int]]:
  """Batches of exactly ``size`` (the last filled up with copies of its first item) and how many
  of each are real."""
  for start in range(0, len(items), size):
    batch = list(items[start:start + size])
    yield batch + [batch[0]] * (size - len(batch)), len(batch)


def _longest_first(lengths: Sequence[int]) -> list[int]:
  return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _generate(loaded: loading.LoadedModel, prompts: Sequence[list[int]], settings: EvalSettings,
              eos_ids: Sequence[int], task: str) -> list[list[int]]:
  order = _longest_first([len(p) for p in prompts])
  sampling = decode.SamplingConfig(max_new_tokens=settings.max_new_tokens)
  outputs: list[list[int]] = [[] for _ in prompts]
  bar = progress.Bar(f"{task}: generating", len(prompts), "answers")
  for batch, real in _batches(order, settings.batch_size):
    generated = decode.generate(loaded.model, loaded.params, [prompts[i] for i in batch], sampling,
                                eos_ids=eos_ids, mesh=loaded.mesh, rules=loaded.rules,
                                bucket=settings.length_bucket)
    for i, ids in zip(batch[:real], generated):
      outputs[i] = ids
    bar.update(real)
  return outputs


def _score_options(loaded: loading.LoadedModel, prompts: Sequence[list[int]],
                   options: Sequence[Sequence[list[int]]], settings: EvalSettings,
                   task: str) -> list[list[float]]:
  """Per example, the log-likelihood of each option's ids after its prompt."""
  limit = loaded.config.max_position_embeddings
  pairs = [(fit_prompt(prompt, limit - len(option)), option)
           for prompt, example_options in zip(prompts, options) for option in example_options]
  order = _longest_first([len(p) + len(c) for p, c in pairs])
  scores = [0.0] * len(pairs)
  for batch, real in _batches(order, settings.batch_size):
    results = decode.score(loaded.model, loaded.params, [pairs[i] for i in batch],
                           mesh=loaded.mesh, rules=loaded.rules, bucket=settings.length_bucket)
    for i, (loglikelihood, _) in zip(batch[:real], results):
      scores[i] = loglikelihood
  logging.info("%s: scored %d options", task, len(pairs), extra=progress.FILE_ONLY)
  bounds = np.cumsum([0, *(len(o) for o in options)])
  return [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _user_turn(row: Mapping[str, Any]) -> Conversation:
  return Conversation((Turn(USER, _text(row["inputs_pretokenized"])),))


def prompt_ids(row: Mapping[str, Any], vocabulary: seqio.Vocabulary,
               chat_template: str | None) -> list[int]:
  """The task's prompt ids, or its prompt text as the one user turn of ``chat_template``."""
  if chat_template is None:
    return row["inputs"].tolist()
  return chat.render_prompt(_user_turn(row), vocabulary, chat_template)


def prompt_text(row: Mapping[str, Any], chat_template: str | None) -> str:
  """The task's prompt text, or the text of ``chat_template`` around it as the one user turn (what
  :func:`prompt_ids` encodes, without BOS)."""
  if chat_template is None:
    return _text(row["inputs_pretokenized"])
  return "".join(piece.text for piece in chat.segments(_user_turn(row), chat_template))


# --------------------------------------------------------------------------------------------------
# Generation backends: where a task's generated text comes from.


@dataclasses.dataclass(frozen=True)
class Generations:
  texts: list[str]  # one per example, as generated (before stop sequences cut it)
  truncated_prompts: int  # prompts cut from the left to fit the context


class GenerationBackend(Protocol):
  """Generates for a task's rows; each backend takes the prompt in the form it needs (ids for the
  model in memory, text for a served model), so the prompts, postprocessing and scorers downstream
  are the same whatever produced the text."""

  def generate(self, task: str, rows: Sequence[Mapping[str, Any]], vocabulary: seqio.Vocabulary,
               settings: EvalSettings) -> Generations: ...

  def record(self) -> dict[str, Any]:
    """What results.json says about this backend in each task's entry."""


@runtime_checkable
class OptionScorer(Protocol):
  """A backend that also gives the log-likelihood of each option after its prompt."""

  def score_options(self, task: str, rows: Sequence[Mapping[str, Any]],
                    vocabulary: seqio.Vocabulary, settings: EvalSettings) -> list[list[float]]: ...


NO_OPTION_SCORES = ("option log-likelihood ranking needs the model's log-probabilities of given "
                    "continuations, which chat/completions endpoints do not return")


@dataclasses.dataclass(frozen=True)
class LocalBackend:
  """The model in memory: greedy generation with the KV cache, option scoring by ``decode.score``;
  prompts longer than the context minus ``max_new_tokens`` are cut from the left."""

  loaded: loading.LoadedModel

  def record(self) -> dict[str, Any]:
    return {}

  def generate(self, task: str, rows: Sequence[Mapping[str, Any]], vocabulary: seqio.Vocabulary,
               settings: EvalSettings) -> Generations:
    config = self.loaded.config
    max_prompt = config.max_position_embeddings - settings.max_new_tokens
    if max_prompt < 2:
      raise ValueError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in "
                       f"{config.max_position_embeddings} positions")
    full_prompts = [prompt_ids(row, vocabulary, settings.chat_template) for row in rows]
    prompts = [fit_prompt(ids, max_prompt) for ids in full_prompts]
    truncated = sum(len(p) < len(ids) for p, ids in zip(prompts, full_prompts))
    if truncated:
      logging.warning("%s: %d of %d prompts cut from the left to %d tokens", task, truncated,
                      len(rows), max_prompt)
    eos_ids = tuple(config.eos_token_ids) or (vocabulary.eos_id,)
    generated = _generate(self.loaded, prompts, settings, eos_ids, task)
    return Generations([vocabulary.decode(ids) for ids in generated], truncated)

  def score_options(self, task: str, rows: Sequence[Mapping[str, Any]],
                    vocabulary: seqio.Vocabulary, settings: EvalSettings) -> list[list[float]]:
    prompts = [prompt_ids(row, vocabulary, settings.chat_template) for row in rows]
    options = [[vocabulary.encode(_text(o)) for o in row["options"]] for row in rows]
    return _score_options(self.loaded, prompts, options, settings, task)


class ApiBackend:
  """A model behind an OpenAI-compatible endpoint (``medllama_jax.eval.api``), sent each prompt's
  text; the answers are cached in ``cache_dir``, one file per task, so a rerun resumes."""

  def __init__(self, settings: api.ApiSettings, cache_dir: str):
    self.settings = settings
    self.client = api.ApiClient(settings)
    self.cache_dir = cache_dir

  def record(self) -> dict[str, Any]:
    s = self.settings
    return {"api": {"base_url": s.base_url, "endpoint": s.endpoint, "model": s.model,
                    "system_prompt": s.system_prompt, "temperature": 0}}

  def generate(self, task: str, rows: Sequence[Mapping[str, Any]], vocabulary: seqio.Vocabulary,
               settings: EvalSettings) -> Generations:
    del vocabulary  # the endpoint tokenizes the text itself
    if settings.chat_template is not None and self.settings.endpoint == "chat":
      raise ValueError(f"chat template {settings.chat_template!r}: a chat endpoint applies the "
                       f"served model's own template; templates are for the completions endpoint")
    bodies = [api.request_body(self.settings, prompt_text(row, settings.chat_template),
                               settings.max_new_tokens, settings.stop_sequences) for row in rows]
    completions = api.complete_all(self.client, bodies,
                                   os.path.join(self.cache_dir, f"{task}.jsonl"), task)
    cut = sum(c.finish_reason == "length" for c in completions)
    if cut:
      logging.warning("%s: %d of %d answers stopped at max_tokens=%d", task, cut, len(rows),
                      settings.max_new_tokens)
    return Generations([c.text for c in completions], 0)


def run_task(model: loading.LoadedModel | GenerationBackend, name: str,
             settings: EvalSettings) -> TaskResult:
  """Generates for (and, for multiple choice, scores the options of) every test example of Task
  ``name``, and applies its metric functions. ``model``: a loaded model (:class:`LocalBackend`) or
  any backend; one that cannot score options leaves those metrics out and says why."""
  backend = LocalBackend(model) if isinstance(model, loading.LoadedModel) else model
  task = seqio.get_mixture_or_task(name)
  rows = list(task.get_dataset(sequence_length=None, split=SPLIT, shuffle=False)
              .as_numpy_iterator())
  if not rows:
    raise ValueError(f"task {name}: the {SPLIT} split is empty")
  vocabulary = task.output_features["inputs"].vocabulary
  generations = backend.generate(name, rows, vocabulary, settings)
  texts = [cut_at_stop(text, settings.stop_sequences) for text in generations.texts]
  targets = [task.postprocess_fn(row["targets_pretokenized"], example=row, is_target=True)
             for row in rows]
  predictions = [task.postprocess_fn(text, example=row, is_target=False)
                 for text, row in zip(texts, rows)]
  metrics: dict[str, Any] = {}
  for metric_fn in task.predict_metric_fns:
    metrics.update(metric_fn(targets, predictions))
  records = [{"index": int(row["index"]), "prediction": text,
              "target": _text(row["targets_pretokenized"])} for row, text in zip(rows, texts)]
  details = backend.record()
  if settings.score_options and task.score_metric_fns and "options" in rows[0]:
    if isinstance(backend, OptionScorer):
      option_scores = backend.score_options(name, rows, vocabulary, settings)
      for metric_fn in task.score_metric_fns:
        metrics.update(metric_fn(targets, option_scores))
      for record, scores in zip(records, option_scores):
        record["option_loglikelihoods"] = scores
    else:
      logging.warning("%s: loglikelihood/* not computed: %s", name, NO_OPTION_SCORES)
      details["not_computed"] = {"loglikelihood/*": NO_OPTION_SCORES}
  logging.info("%s: %s", name, _headline(metrics))
  return TaskResult(name, metrics, records, generations.truncated_prompts, details)


# --------------------------------------------------------------------------------------------------
# Output.


def _task_record(result: TaskResult) -> dict[str, Any]:
  info = mibe.TASKS.get(result.task)
  construction = {} if info is None else {
      "dataset": info.dataset, "num_shots": info.num_shots, "prompt_variant": info.prompt_variant,
      "fewshot_seed": info.fewshot_seed, "data_dir": info.dataset_dir}
  return {**construction, "num_examples": len(result.predictions),
          "truncated_prompts": result.truncated_prompts, "metrics": result.metrics,
          **result.details}


def published_values(results: Sequence[TaskResult], paper_model: str
                     ) -> dict[str, paper.PublishedValue]:
  """Task → the paper's Table 3 value for ``paper_model`` on its dataset, for the zero-shot MIBE
  tasks among ``results`` (the table is zero-shot; MMLU is not in it). Raises for a model the paper
  does not report."""
  paper.check_model(paper_model)
  out = {}
  for r in results:
    info = mibe.TASKS.get(r.task)
    value = None if info is None or info.num_shots else paper.published(paper_model, info.dataset)
    if value is not None:
      out[r.task] = value
  return out


def _split_key(key: str) -> tuple[str, str]:
  """A metric key ``{scoring}/{metric}`` as (scoring, metric)."""
  scoring, _, metric = key.rpartition("/")
  return scoring, metric


def _headline(metrics: Mapping[str, Any]) -> str:
  """The first few scores of a task, for its console line (all of them are in results.md)."""
  shown = [f"{key} {value:.4f}" for key, value in score_scalars(metrics).items()]
  more = len(shown) - _HEADLINE_SCORES
  return ", ".join(shown[:_HEADLINE_SCORES]) + (f", … {more} more in results.md" if more > 0 else "")


def score_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The metrics that are scores, as TensorBoard scalars: computed (not None) and not a setting."""
  return {key: float(value) for key, value in metrics.items()
          if value is not None and _split_key(key)[1] not in SETTING_METRICS}


def markdown_table(results: Sequence[TaskResult], paper_model: str | None = None) -> str:
  """The paper's Table 3 layout: a row per task and scoring (the ``release``/``fixed``/
  ``loglikelihood`` prefix of the metric keys), a column per metric (first-seen order); blank where
  a row has no such metric, "n/a" where it was not computed (BERTScore without an encoder). Only
  scores: the :data:`SETTING_METRICS` go to :func:`task_table`.

  ``paper_model`` (a model of ``paper.MODELS``) adds a last column with the paper's published
  value, as printed and with the paper's metric name, in the row of the scoring it corresponds to
  (``release``), and the source under the table."""
  rows: dict[tuple[str, str], dict[str, Any]] = {}
  for r in results:
    for key, value in r.metrics.items():
      scoring, metric = _split_key(key)
      if metric not in SETTING_METRICS:
        rows.setdefault((r.task, scoring), {})[metric] = value
  columns = list(dict.fromkeys(metric for values in rows.values() for metric in values))
  published = {} if paper_model is None else published_values(results, paper_model)

  def cell(values: Mapping[str, Any], metric: str) -> str:
    if metric not in values:
      return ""
    return "n/a" if values[metric] is None else f"{values[metric]:.4f}"

  def paper_cell(task: str, scoring: str) -> list[str]:
    if paper_model is None:
      return []
    value = published.get(task)
    return [f"{value.metric.name} {value.text}" if value and scoring == paper.SCORING else ""]

  header = ["task", "scoring", *columns, *([f"paper: {paper_model}"] if paper_model else [])]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join([task, scoring, *(cell(values, m) for m in columns),
                               *paper_cell(task, scoring)]) + " |"
            for (task, scoring), values in rows.items()]
  if paper_model is not None:
    lines += ["", f"Paper column: {paper.SOURCE}; it stands in the `{paper.SCORING}` rows, the "
              "scoring that reproduces the paper's evaluation code."]
  return "\n".join(lines) + "\n"


def _setting_keys(results: Sequence[TaskResult]) -> list[str]:
  """The metric keys of :data:`SETTING_METRICS` among ``results``, in first-seen order."""
  return list(dict.fromkeys(key for r in results for key in r.metrics
                            if _split_key(key)[1] in SETTING_METRICS))


def _integer(value: Any) -> str:
  return "" if value is None else str(int(value))


def task_table(results: Sequence[TaskResult]) -> str:
  """A row per task with what its scores rest on, as integers: the examples scored, the prompts cut
  from the left to fit the context (their scores saw only the end of the prompt), the shots and,
  where demonstrations were drawn, their seed, then each seed a metric function recorded (e.g.
  ``release/bootstrap_seed`` as "bootstrap seed (release)"). Shots and few-shot seed are blank for
  a task that is not a MIBE task."""
  settings = _setting_keys(results)
  header = ["task", "examples", "truncated prompts", "shots", "few-shot seed",
            *(f"{metric.replace('_', ' ')} ({scoring})"
              for scoring, metric in map(_split_key, settings))]

  def row(r: TaskResult) -> list[str]:
    info = mibe.TASKS.get(r.task)
    shots = "" if info is None else str(info.num_shots)
    seed = "" if info is None or not info.num_shots else str(info.fewshot_seed)
    return [r.task, str(len(r.predictions)), str(r.truncated_prompts), shots, seed,
            *(_integer(r.metrics.get(key)) for key in settings)]

  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(row(r)) + " |" for r in results]
  return "\n".join(lines) + "\n"


def results_markdown(model_dir: str, results: Sequence[TaskResult],
                     paper_model: str | None = None) -> str:
  """results.md: the scores (:func:`markdown_table`), then per task its counts and seeds
  (:func:`task_table`), so that a score never stands beside a count or a seed."""
  return (f"Model: `{model_dir}`\n\n## Scores\n\n{markdown_table(results, paper_model)}\n"
          f"## Examples, truncated prompts and seeds\n\n{task_table(results)}")


@gin.configurable(allowlist=["paper_model"])
def write_results(out_dir: str, model_dir: str, results: Sequence[TaskResult],
                  settings: EvalSettings, write_predictions: bool, step: int,
                  paper_model: str | None = None) -> None:
  """results.json, results.md, TensorBoard scalars and, if asked, predictions (module docstring).

  ``paper_model`` (gin-bindable, ``medllama-eval --compare_to_paper``): put the paper's published
  numbers for that model beside ours, in results.md and under ``paper`` in results.json."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  summary = {
      "model": model_dir, "split": SPLIT, "decoding": "greedy",
      "max_new_tokens": settings.max_new_tokens, "stop_sequences": list(settings.stop_sequences),
      "batch_size": settings.batch_size, "score_options": settings.score_options,
      "task_names": [r.task for r in results],
      "tasks": {r.task: _task_record(r) for r in results},
  }
  if paper_model is not None:
    summary["paper"] = {"model": paper_model, "source": paper.SOURCE, "scoring": paper.SCORING,
                        "tasks": {task: {"metric": v.metric.name, "key": v.metric.key,
                                         "published": v.value}
                                  for task, v in published_values(results, paper_model).items()}}
  (out / "results.json").write_text(json.dumps(summary, indent=2))
  (out / "results.md").write_text(results_markdown(model_dir, results, paper_model))
  writer = metric_writers.create_default_writer(os.path.join(out_dir, "tensorboard"),
                                                asynchronous=False)
  writer.write_scalars(step, {f"{r.task}/{key}": value for r in results
                              for key, value in score_scalars(r.metrics).items()})
  writer.close()
  if write_predictions:
    (out / "predictions").mkdir(exist_ok=True)
    for r in results:
      (out / "predictions" / f"{r.task}.jsonl").write_text(
          "".join(json.dumps(p) + "\n" for p in r.predictions))


def evaluate_model(model: loading.LoadedModel | GenerationBackend, task_names: Sequence[str],
                   out_dir: str, settings: EvalSettings, model_name: str,
                   write_predictions: bool = False, step: int = 0) -> dict[str, dict[str, Any]]:
  """Runs the Tasks on a model already on its mesh (or a backend, as ``run_task`` takes) and writes
  the results under ``out_dir``; returns task → metrics. ``evaluate`` reads a model folder into it;
  the trainer passes the parameters it holds (``model_name`` says what was evaluated, in
  results.json and results.md)."""
  results = [run_task(model, name, settings) for name in task_names]
  if jax.process_index() == 0:
    write_results(out_dir, model_name, results, settings, write_predictions, step)
  logging.info("results: %s", os.path.join(out_dir, "results.json"))
  return {r.task: r.metrics for r in results}


@gin.configurable
def evaluate(model_dir: str = gin.REQUIRED, task_names: Sequence[str] = gin.REQUIRED,
             out_dir: str = gin.REQUIRED, max_new_tokens: int = 256, batch_size: int = 8,
             stop_sequences: Sequence[str] = (), score_options: bool = True,
             write_predictions: bool = False, mesh: str = "data=1,fsdp=-1,tensor=1",
             dtype: str = "float32", step: int = 0, chat_template: str | None = None,
             adapters: str | None = None, length_bucket: int = EvalSettings.length_bucket,
             verify_checksums: bool = True) -> dict[str, dict[str, Any]]:
  """Evaluates the model folder ``model_dir`` (Orbax or HF) on registered Tasks; returns task →
  metrics. ``mesh``: axis sizes as ``medllama-generate --mesh`` takes them; ``step``: the
  TensorBoard step the scalars are written at (e.g. the checkpoint's training step);
  ``chat_template``: prompt instruction-tuned models as they were trained; ``adapters``: a LoRA
  adapter folder run unmerged on top of ``model_dir``; ``length_bucket``: prompts are padded to a
  multiple of it (one compiled program per bucket: larger means fewer compilations, more padding);
  ``verify_checksums=False`` skips the check of the parameters against their recorded checksums.
  """
  settings = EvalSettings(max_new_tokens, batch_size, tuple(stop_sequences), score_options,
                          length_bucket, chat_template)
  device_mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(mesh))
  loaded = loading.load_model(model_dir, device_mesh, dtype=dtype, param_dtype=dtype,
                              adapters=adapters, verify_checksums=verify_checksums)
  return evaluate_model(loaded, task_names, out_dir, settings, model_dir, write_predictions, step)
