"""Catastrophic forgetting: the same benchmarks on a base model and its continually trained
descendants, in one table of scores and their deltas against the base.

Me-LLaMA measured what continual pre-training and instruction tuning cost on general-domain
benchmarks (MMLU, ARC, HellaSwag, PIQA, BoolQ, WinoGrande, TruthfulQA) while they gained on medical
ones. A study here is a list of models (model folders, and checkpoints of training runs with their
``final_model``) and a task set (:class:`ForgettingStudy`): lm-evaluation-harness tasks, run through
``medllama_jax.eval.harness`` on the model as it is sharded, and MIBE tasks, run through
``medllama_jax.eval.evaluator`` as ``medllama-eval`` runs them. Models are loaded and evaluated one
at a time, so a study needs the memory of one model.

Written to ``out_dir``:

* ``forgetting.md``: a row per task and metric, a column per model: the base's value, then each
  other model's value with its delta, ``0.412 (−0.031)``;
* ``forgetting.json``: the models (name, folder, run and training step), the base, the tasks and
  settings, every value and every delta (the base's are 0);
* per model ``models/{name}/``: the harness scores (``harness.json``) and the MIBE results
  (``mibe/``, what ``medllama-eval`` writes);
* for the checkpoints of a run, TensorBoard scalars ``forgetting/{task}/{metric}`` and
  ``forgetting_delta/{task}/{metric}`` at each checkpoint's training step, under
  ``tensorboard/{run name}`` (a run of its own in TensorBoard, beside the run's training curves).

Standard errors (``*_stderr``, as the harness reports them) stay in ``values`` but get no delta and
no row: a difference of standard errors says nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
from absl import logging
from etils import epath

from medllama_jax import loading, partitioning, progress
from medllama_jax.eval.settings import EvalSettings

# The general-domain set the paper reports before and after continual training.
PAPER_GENERAL_TASKS = ("mmlu", "arc_challenge", "arc_easy", "hellaswag", "piqa", "boolq",
                       "winogrande", "truthfulqa_mc2")
STDERR_SUFFIX = "_stderr"
MARKDOWN_FILE = "forgetting.md"
JSON_FILE = "forgetting.json"
TENSORBOARD_DIR = "tensorboard"
MINUS = "\N{MINUS SIGN}"

# task → metric → value
Scores = dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One column of the table. ``path`` is a model folder, or for a run's checkpoint the run folder
  (``checkpoint=True``); ``step`` is the training step of a run's checkpoint or final model."""

  name: str
  path: str
  step: int | None = None
  checkpoint: bool = False
  run_dir: str | None = None

  @property
  def tokenizer_dir(self) -> str:
    """The folder whose tokenizer MIBE prompts are encoded with (a checkpoint: its run's final
    model, which ``loading.load_run_checkpoint`` takes the tokenizer from too)."""
    if self.checkpoint:
      return os.path.join(self.path, loading.RUN_FINAL_MODEL_DIR)
    return self.path

  def record(self) -> dict[str, Any]:
    return {"name": self.name, "path": self.path, "step": self.step,
            "checkpoint": self.checkpoint, "run": self.run_dir}


def run_models(run_dir: str, every: int = 1) -> list[ModelEntry]:
  """Every ``every``-th complete checkpoint of a run (the first, then every ``every``-th after it)
  and its ``final_model``, named ``{run}@{step}``. The final model stands for the last checkpoint
  (it holds the same parameters, LoRA ones merged), which is therefore not evaluated twice."""
  if every < 1:
    raise ValueError(f"--every {every} must be at least 1")
  run_dir = os.path.abspath(run_dir)
  run = os.path.basename(run_dir.rstrip(os.sep))
  steps = loading.run_checkpoint_steps(run_dir)
  final = os.path.join(run_dir, loading.RUN_FINAL_MODEL_DIR)
  has_final = (epath.Path(final) / "config.json").exists()
  chosen = [s for s in steps[::every] if not (has_final and s == steps[-1])]
  entries = [ModelEntry(f"{run}@{s}", run_dir, s, checkpoint=True, run_dir=run_dir)
             for s in chosen]
  if has_final:
    entries.append(ModelEntry(f"{run}@{steps[-1] if steps else 'final'}", final,
                              steps[-1] if steps else None, run_dir=run_dir))
  if not entries:
    raise FileNotFoundError(f"{run_dir}: no complete checkpoint and no final_model")
  return entries


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ForgettingStudy:
  """What every model is evaluated on, and how.

  ``harness_tasks``: lm-evaluation-harness task (or group) names, looked up among lm_eval's own and
  the YAML files under ``include_path``; ``num_fewshot`` (None: each task's default), ``limit``
  (examples per task; None: all) and ``seed`` as ``lm_eval`` takes them. ``mibe_tasks``: MIBE
  dataset names (``medllama_jax/eval/datasets.py``) read from ``data_dir``, at ``mibe_num_shots``
  shots, decoded as ``medllama-eval`` does (``max_new_tokens``, ``batch_size``,
  ``chat_template``). ``mesh`` and ``dtype`` as ``medllama-eval`` takes them.
  """

  harness_tasks: Sequence[str] = PAPER_GENERAL_TASKS
  include_path: str | None = None
  num_fewshot: int | None = None
  limit: int | None = None
  seed: int = 0
  mibe_tasks: Sequence[str] = ()
  data_dir: str | None = None
  mibe_num_shots: Sequence[int] = (0,)
  max_new_tokens: int = EvalSettings.max_new_tokens
  batch_size: int = EvalSettings.batch_size
  chat_template: str | None = None
  mesh: str = "data=1,fsdp=-1,tensor=1"
  dtype: str = "float32"
  verify_checksums: bool = True

  def __post_init__(self):
    for name in ("harness_tasks", "mibe_tasks", "mibe_num_shots"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not self.harness_tasks and not self.mibe_tasks:
      raise ValueError("no tasks: name harness tasks, MIBE tasks or both")
    if self.mibe_tasks and self.data_dir is None:
      raise ValueError("MIBE tasks need data_dir (--data_dir): the folder of the MIBE datasets")

  def record(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _load(entry: ModelEntry, study: ForgettingStudy, mesh) -> loading.LoadedModel:
  runtime = {"dtype": study.dtype, "param_dtype": study.dtype}
  if entry.checkpoint:
    return loading.load_run_checkpoint(entry.path, entry.step, mesh,
                                       verify_checksums=study.verify_checksums, **runtime)
  return loading.load_model(entry.path, mesh, verify_checksums=study.verify_checksums, **runtime)


def harness_scores(loaded: loading.LoadedModel, study: ForgettingStudy) -> Scores:
  """The study's harness tasks on a model in memory."""
  from medllama_jax.eval import harness  # lm_eval is an optional extra.

  lm = harness.MedllamaLM(loaded, batch_size=study.batch_size, max_gen_toks=study.max_new_tokens)
  return harness.run_harness(lm, study.harness_tasks, study.include_path, study.num_fewshot,
                             study.limit, study.seed)


def mibe_scores(loaded: loading.LoadedModel, entry: ModelEntry, study: ForgettingStudy,
                out_dir: str) -> Scores:
  """The study's MIBE tasks through the evaluator (its results written under ``out_dir``),
  prompts encoded with the model's tokenizer; only the scores (``evaluator.score_scalars``)."""
  import seqio_tasks.mibe
  from medllama_jax.eval import evaluator

  names = seqio_tasks.mibe.register_mibe_tasks(study.data_dir, entry.tokenizer_dir,
                                               datasets=list(study.mibe_tasks),
                                               num_shots=list(study.mibe_num_shots))
  settings = EvalSettings(study.max_new_tokens, study.batch_size,
                          chat_template=study.chat_template)
  metrics = evaluator.evaluate_model(loaded, names, out_dir, settings, entry.name,
                                     step=entry.step or 0)
  return {task: evaluator.score_scalars(values) for task, values in metrics.items()}


def evaluate_entry(entry: ModelEntry, study: ForgettingStudy, mesh, out_dir: str) -> Scores:
  """All of the study's tasks on one model; its own results go to ``out_dir/models/{name}``."""
  model_dir = os.path.join(out_dir, "models", entry.name)
  with progress.stage(f"loading {entry.name} ({entry.path}"
                      f"{'' if entry.step is None else f', step {entry.step}'})"):
    loaded = _load(entry, study, mesh)
  scores: Scores = {}
  if study.harness_tasks:
    with progress.stage(f"{entry.name}: lm-evaluation-harness {', '.join(study.harness_tasks)}"):
      scores.update(harness_scores(loaded, study))
    if jax.process_index() == 0:
      epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
      (epath.Path(model_dir) / "harness.json").write_text(json.dumps(scores, indent=2))
  if study.mibe_tasks:
    with progress.stage(f"{entry.name}: MIBE {', '.join(study.mibe_tasks)}"):
      mibe = mibe_scores(loaded, entry, study, os.path.join(model_dir, "mibe"))
    clashing = sorted(set(mibe) & set(scores))
    if clashing:
      raise ValueError(f"tasks named both by the harness and MIBE: {', '.join(clashing)}")
    scores.update(mibe)
  return scores


def is_score(metric: str) -> bool:
  """Whether a metric gets a delta and a row (standard errors do not)."""
  return not metric.endswith(STDERR_SUFFIX)


def deltas(values: Mapping[str, Scores], base: str) -> dict[str, Scores]:
  """model → task → metric → value minus the base's, for the scores the base has too."""
  reference = values[base]
  return {model: {task: {metric: value - reference[task][metric]
                         for metric, value in metrics.items()
                         if is_score(metric) and metric in reference.get(task, {})}
                  for task, metrics in scores.items()}
          for model, scores in values.items()}


def rows(values: Mapping[str, Scores]) -> list[tuple[str, str]]:
  """(task, metric) of every score, in first-seen order."""
  return list(dict.fromkeys((task, metric) for scores in values.values()
                            for task, metrics in scores.items()
                            for metric in metrics if is_score(metric)))


def _signed(delta: float) -> str:
  text = f"{abs(delta):.3f}"
  return f"+{text}" if delta >= 0 else f"{MINUS}{text}"


def markdown(values: Mapping[str, Scores], base: str) -> str:
  """forgetting.md: a row per task/metric, the base's column first, then each model's value with
  its delta against the base; blank where a model has no such score."""
  changes = deltas(values, base)
  models = [base, *(m for m in values if m != base)]

  def cell(model: str, task: str, metric: str) -> str:
    value = values[model].get(task, {}).get(metric)
    if value is None:
      return ""
    delta = changes[model].get(task, {}).get(metric)
    return f"{value:.3f}" if model == base or delta is None else f"{value:.3f} ({_signed(delta)})"

  header = ["task", "metric", f"{base} (base)", *models[1:]]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join([task, metric, *(cell(m, task, metric) for m in models)]) + " |"
            for task, metric in rows(values)]
  return (f"# Forgetting: scores against `{base}`\n\n" + "\n".join(lines) + "\n\n"
          f"Deltas are each model's value minus {base}'s.\n")


def write_tensorboard(out_dir: str, entries: Sequence[ModelEntry], values: Mapping[str, Scores],
                      changes: Mapping[str, Scores]) -> list[str]:
  """Scalars of the run models at their training steps, one TensorBoard run per training run;
  returns the folders written."""
  from clu import metric_writers

  written = []
  for run_dir in dict.fromkeys(e.run_dir for e in entries if e.run_dir and e.step is not None):
    directory = os.path.join(out_dir, TENSORBOARD_DIR, os.path.basename(run_dir.rstrip(os.sep)))
    writer = metric_writers.create_default_writer(directory, asynchronous=False)
    for entry in (e for e in entries if e.run_dir == run_dir and e.step is not None):
      scalars = {f"forgetting/{task}/{metric}": value
                 for task, metrics in values[entry.name].items()
                 for metric, value in metrics.items() if is_score(metric)}
      scalars.update({f"forgetting_delta/{task}/{metric}": value
                      for task, metrics in changes[entry.name].items()
                      for metric, value in metrics.items()})
      writer.write_scalars(entry.step, scalars)
    writer.close()
    written.append(directory)
  return written


def write_report(out_dir: str, entries: Sequence[ModelEntry], base: str,
                 values: Mapping[str, Scores], study: ForgettingStudy) -> dict[str, Any]:
  """forgetting.md, forgetting.json and the runs' TensorBoard scalars (written by the primary
  host); returns the JSON record."""
  changes = deltas(values, base)
  record = {"base": base, "models": [e.record() for e in entries], "settings": study.record(),
            "tasks": {"harness": list(study.harness_tasks), "mibe": list(study.mibe_tasks)},
            "values": values, "deltas": changes}
  if jax.process_index() != 0:
    return record
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / JSON_FILE).write_text(json.dumps(record, indent=2))
  (out / MARKDOWN_FILE).write_text(markdown(values, base))
  write_tensorboard(out_dir, entries, values, changes)
  return record


def study_forgetting(entries: Sequence[ModelEntry], study: ForgettingStudy, out_dir: str,
                     base: str | None = None) -> dict[str, Any]:
  """Evaluates every model of ``entries`` (``base``: the name of the one the deltas are taken
  against; default the first) and writes the report (module docstring); returns forgetting.json's
  record."""
  names = [e.name for e in entries]
  if not entries:
    raise ValueError("no models to evaluate")
  if len(set(names)) != len(names):
    raise ValueError(f"model names must differ: {', '.join(names)}")
  base = names[0] if base is None else base
  if base not in names:
    raise ValueError(f"base {base!r} is not one of the models: {', '.join(names)}")
  mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(study.mesh))
  values = {entry.name: evaluate_entry(entry, study, mesh, out_dir) for entry in entries}
  record = write_report(out_dir, entries, base, values, study)
  logging.info("forgetting table: %s", os.path.join(out_dir, MARKDOWN_FILE))
  return record
