"""MIBE (or any seqio Task) evaluation of the parameters being trained, every N training steps.

Bound into the trainer from gin::

  train.task_eval = @TaskEvaluation()
  TaskEvaluation.task_names = @seqio_tasks.mibe.register_mibe_tasks()
  TaskEvaluation.every = 1000
  TaskEvaluation.max_new_tokens = 256
  TaskEvaluation.chat_template = "medllama"      # instruction tuning: prompt as trained
  register_mibe_tasks.data_dir = "/data/mibe"
  register_mibe_tasks.vocabulary_path = %INIT_CHECKPOINT

The evaluator (``medllama_jax.eval.evaluator``) runs on the parameters the trainer holds, sharded
as they are trained (a LoRA run evaluates its frozen base with the adapters unmerged), so nothing is
saved or reloaded for it and a curve of task scores costs no checkpoint. It writes what
``medllama-eval`` writes (``results.json``, ``results.md``) under ``run_dir/task_eval/step_{N}/``;
the trainer adds the scalars ``{task}/{metric}`` to the run's TensorBoard and ``metrics.jsonl`` at
step N.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import gin
import seqio

from medllama_jax import chat, loading
from medllama_jax.eval import evaluator

OUT_SUBDIR = "task_eval"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskEvaluation:
  """Which registered Tasks to run every ``every`` steps (and at the last step), and how to decode
  (as ``evaluator.EvalSettings``: greedy, up to ``max_new_tokens``, ``batch_size`` prompts a batch).
  Checked when the trainer starts, not first at step ``every``."""

  task_names: Sequence[str] = ()
  every: int = 1000
  max_new_tokens: int = 256
  batch_size: int = 8
  chat_template: str | None = None
  stop_sequences: Sequence[str] = ()
  score_options: bool = True
  write_predictions: bool = False

  def __post_init__(self):
    object.__setattr__(self, "task_names", tuple(self.task_names))
    object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
    if not self.task_names:
      raise ValueError("TaskEvaluation.task_names is empty: bind it, e.g. to "
                       "@seqio_tasks.mibe.register_mibe_tasks()")
    if self.every < 1:
      raise ValueError(f"TaskEvaluation.every={self.every} must be at least 1")
    if self.chat_template is not None and self.chat_template not in chat.TEMPLATES:
      raise ValueError(f"TaskEvaluation.chat_template={self.chat_template!r} is not one of "
                       f"{sorted(chat.TEMPLATES)}")
    for name in self.task_names:
      seqio.get_mixture_or_task(name)  # An unknown name fails now, naming the registered ones.

  @property
  def settings(self) -> evaluator.EvalSettings:
    return evaluator.EvalSettings(self.max_new_tokens, self.batch_size, self.stop_sequences,
                                  self.score_options, chat_template=self.chat_template)

  def run(self, loaded: loading.LoadedModel, run_dir: str, step: int) -> dict[str, float]:
    """Evaluates ``loaded`` (the run's model at ``step``), writes the results and returns the
    scalars ``{task}/{metric}`` of the scores (``evaluator.score_scalars``: metrics that were not
    computed, such as BERTScore without an encoder, and settings such as seeds are left out)."""
    out_dir = os.path.join(run_dir, OUT_SUBDIR, f"step_{step}")
    metrics = evaluator.evaluate_model(loaded, self.task_names, out_dir, self.settings,
                                       f"{run_dir} (training step {step})",
                                       self.write_predictions, step)
    return {f"{task}/{key}": value for task, values in metrics.items()
            for key, value in evaluator.score_scalars(values).items()}
