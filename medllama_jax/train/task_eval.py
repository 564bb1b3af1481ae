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

lm-evaluation-harness tasks (general-domain benchmarks, to watch forgetting while training) run
the same way, through ``medllama_jax.eval.harness`` on the parameters in memory (lm_eval, an
optional extra, is imported only when they are set)::

  TaskEvaluation.harness_tasks = ["arc_easy", "hellaswag"]
  TaskEvaluation.harness_include_path = "/data/harness_tasks"   # local task YAMLs, if any
  TaskEvaluation.harness_limit = 500

Their scores go to ``run_dir/task_eval/step_{N}/harness.json`` and, as the MIBE ones, to the
scalars ``{task}/{metric}``. ``task_names`` may then be empty.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import gin
import jax
import seqio
from etils import epath

from medllama_jax import chat, loading
from medllama_jax.eval import evaluator

OUT_SUBDIR = "task_eval"
HARNESS_FILE = "harness.json"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskEvaluation:
  """Which registered Tasks to run every ``every`` steps (and at the last step), and how to decode
  (as ``evaluator.EvalSettings``: greedy, up to ``max_new_tokens``, ``batch_size`` prompts a batch).
  ``harness_tasks``: lm-evaluation-harness tasks run as ``run_harness`` runs them
  (``harness_include_path``, ``harness_num_fewshot``, ``harness_limit``), the prompts encoded with
  the trainer's tokenizer (its ``tokenizer_dir`` or ``init_checkpoint``) unless ``harness_tokenizer``
  names another folder. Checked when the trainer starts, not first at step ``every``."""

  task_names: Sequence[str] = ()
  every: int = 1000
  max_new_tokens: int = 256
  batch_size: int = 8
  chat_template: str | None = None
  stop_sequences: Sequence[str] = ()
  score_options: bool = True
  write_predictions: bool = False
  harness_tasks: Sequence[str] = ()
  harness_tokenizer: str | None = None
  harness_include_path: str | None = None
  harness_num_fewshot: int | None = None
  harness_limit: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "task_names", tuple(self.task_names))
    object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
    object.__setattr__(self, "harness_tasks", tuple(self.harness_tasks))
    if not self.task_names and not self.harness_tasks:
      raise ValueError("TaskEvaluation.task_names is empty: bind it, e.g. to "
                       "@seqio_tasks.mibe.register_mibe_tasks(), or bind harness_tasks")
    if self.every < 1:
      raise ValueError(f"TaskEvaluation.every={self.every} must be at least 1")
    if self.chat_template is not None and self.chat_template not in chat.TEMPLATES:
      raise ValueError(f"TaskEvaluation.chat_template={self.chat_template!r} is not one of "
                       f"{sorted(chat.TEMPLATES)}")
    for name in self.task_names:
      seqio.get_mixture_or_task(name)  # An unknown name fails now, naming the registered ones.
    if self.harness_tasks:
      self._check_harness_tasks()

  def _check_harness_tasks(self) -> None:
    """lm_eval installed, every harness task known."""
    try:
      import lm_eval.tasks
    except ImportError as e:
      raise ValueError("TaskEvaluation.harness_tasks need lm_eval: pip install -e '.[lm_eval]'"
                       ) from e
    known = lm_eval.tasks.TaskManager(include_path=self.harness_include_path).all_tasks
    unknown = [name for name in self.harness_tasks if name not in known]
    if unknown:
      raise ValueError(f"TaskEvaluation.harness_tasks: unknown to lm_eval: {', '.join(unknown)} "
                       f"(include_path: {self.harness_include_path})")

  @property
  def settings(self) -> evaluator.EvalSettings:
    return evaluator.EvalSettings(self.max_new_tokens, self.batch_size, self.stop_sequences,
                                  self.score_options, chat_template=self.chat_template)

  def run(self, loaded: loading.LoadedModel, run_dir: str, step: int) -> dict[str, float]:
    """Evaluates ``loaded`` (the run's model at ``step``), writes the results and returns the
    scalars ``{task}/{metric}`` of the scores (``evaluator.score_scalars``: metrics that were not
    computed, such as BERTScore without an encoder, and settings such as seeds are left out), then
    those of the harness tasks."""
    out_dir = os.path.join(run_dir, OUT_SUBDIR, f"step_{step}")
    scores = {}
    if self.task_names:
      metrics = evaluator.evaluate_model(loaded, self.task_names, out_dir, self.settings,
                                         f"{run_dir} (training step {step})",
                                         self.write_predictions, step)
      scores.update({task: evaluator.score_scalars(values) for task, values in metrics.items()})
    if self.harness_tasks:
      scores.update(self._run_harness(loaded, out_dir))
    return {f"{task}/{key}": value for task, values in scores.items()
            for key, value in values.items()}

  def _run_harness(self, loaded: loading.LoadedModel, out_dir: str) -> dict[str, dict[str, float]]:
    """The harness tasks on ``loaded``, written to ``out_dir/harness.json``."""
    from medllama_jax.eval import harness

    lm = harness.MedllamaLM(loaded, batch_size=self.batch_size, max_gen_toks=self.max_new_tokens,
                            tokenizer=self.harness_tokenizer)
    scores = harness.run_harness(lm, self.harness_tasks, self.harness_include_path,
                                 self.harness_num_fewshot, self.harness_limit)
    if jax.process_index() == 0:
      epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
      (epath.Path(out_dir) / HARNESS_FILE).write_text(json.dumps(scores, indent=2))
    return scores
