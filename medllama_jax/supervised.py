"""The paper's supervised setting: evaluate, fine-tune on the training split(s), evaluate again,
tabulate before and after. The command line is ``medllama-supervised``
(``medllama_jax/cli/supervised.py``); the recipes are ``gin/supervised_me_llama_13b.gin`` and
``gin/demo/supervised_demo.gin``.

For one MIBE dataset or several (default: ``seqio_tasks.supervised.SUPERVISED_DATASETS``),
:func:`run_supervised`

1. evaluates ``base_checkpoint`` on their test splits (``evaluator.evaluate``; zero-shot, the
   prompts wrapped in the chat template as one user turn) into ``out_dir/before/``;
2. fine-tunes it (``loop.train``, LoRA or full as the gin file binds ``train``) on the Mixture of
   their training splits (``seqio_tasks.supervised``: the same prompts, rendered in the same
   template, the answer as the response) for ``epochs`` passes over the training examples, in
   ``out_dir/train/``;
3. evaluates the tuned model (``out_dir/train/final_model``) the same way into ``out_dir/after/``;
4. writes ``out_dir/supervised_results.json`` and ``supervised_results.md``: per dataset the metric
   the paper reports for it (``medllama_jax.eval.paper.METRICS``, scored as the paper's code scores
   it), before, after and the difference. The full metrics are in ``before/`` and ``after/``.

Rerunning the same command resumes: training continues from its latest checkpoint, and an
evaluation whose ``results.json`` already holds the same model and tasks is read, not redone
(delete the folder to redo it). A run stopped by SIGTERM during training ends after step 2; rerun
it to finish. Evaluation settings (``max_new_tokens``, ``batch_size``, ``mesh``, ``dtype``,
``score_options``) are ``evaluate``'s gin bindings, training settings ``train``'s, except the
steps, which come from ``epochs`` and ``global_batch_size`` here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
from absl import logging
from etils import epath

import seqio_tasks.mibe
import seqio_tasks.supervised
from medllama_jax import chat
from medllama_jax.eval import evaluator, paper
from medllama_jax.train import loop

RESULTS_JSON = "supervised_results.json"
RESULTS_MD = "supervised_results.md"


def evaluate_or_read(stage_dir: str, model_dir: str, task_names: Sequence[str], template: str,
                   step: int) -> dict[str, dict[str, Any]]:
  """Task → metrics of ``model_dir``: read from ``stage_dir/results.json`` when it holds this
  model and these tasks, else evaluated (and written there)."""
  path = epath.Path(stage_dir) / "results.json"
  if path.exists():
    done = json.loads(path.read_text())
    if done.get("model") == model_dir and done.get("task_names") == list(task_names):
      logging.info("%s: evaluation already done, read from %s", model_dir, path)
      return {name: done["tasks"][name]["metrics"] for name in task_names}
  return evaluator.evaluate(model_dir=model_dir, task_names=list(task_names), out_dir=stage_dir,
                            chat_template=template, step=step)


def comparison(datasets: Sequence[str], task_names: Sequence[str],
               before: Mapping[str, Mapping[str, Any]],
               after: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Dataset → the paper's metric for it, our key for that metric, before, after, delta."""
  rows = {}
  for dataset, task in zip(datasets, task_names):
    metric = paper.METRICS[dataset]
    missing = [stage for stage, m in (("before", before), ("after", after))
               if metric.key not in m.get(task, {})]
    if missing:
      raise KeyError(f"{task}: no {metric.key!r} in the {' and '.join(missing)} results")
    old, new = before[task][metric.key], after[task][metric.key]
    rows[dataset] = {"task": task, "metric": metric.name, "key": metric.key, "before": old,
                     "after": new, "delta": new - old}
  return rows


def comparison_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: a row per dataset, the paper's metric, before, after and the signed delta."""
  lines = ["| dataset | metric | scoring | before | after | delta |", "|---" * 6 + "|"]
  lines += [f"| {dataset} | {row['metric']} | {row['key'].rpartition('/')[0]} | "
            f"{row['before']:.4f} | {row['after']:.4f} | {row['delta']:+.4f} |"
            for dataset, row in rows.items()]
  return "\n".join(lines) + "\n"


def write_comparison(out_dir: str, summary: Mapping[str, Any],
                     rows: Mapping[str, Mapping[str, Any]]) -> None:
  (epath.Path(out_dir) / RESULTS_JSON).write_text(json.dumps({**summary, "datasets": rows}, indent=2))
  header = (f"Supervised fine-tuning of `{summary['base_model']}` → `{summary['tuned_model']}`: "
            f"{summary['train_steps']} steps of {summary['global_batch_size']} on "
            f"{summary['train_examples']} training examples ({summary['epochs']:g} epochs), chat "
            f"template `{summary['template']}`, `{summary['prompt_variant']}` prompts, zero-shot "
            "test splits.")
  (epath.Path(out_dir) / RESULTS_MD).write_text(f"{header}\n\n{comparison_table(rows)}")


@gin.configurable
def run_supervised(out_dir: str = gin.REQUIRED, base_checkpoint: str = gin.REQUIRED,
                   data_dir: str = gin.REQUIRED, datasets: Sequence[str] | None = None,
                   template: str = chat.DEFAULT_TEMPLATE, prompt_variant: str = "release",
                   epochs: float = 3.0, global_batch_size: int = 8
                   ) -> dict[str, dict[str, Any]] | None:
  """Before/after evaluation around fine-tuning on the training splits (module docstring);
  returns dataset → comparison row, or None when training stopped on a termination signal.

  ``data_dir`` holds one folder per dataset with its training and test files
  (``medllama_jax/eval/datasets.py``); ``base_checkpoint`` is a model folder, also the vocabulary.
  Training runs ``ceil(epochs × training examples / global_batch_size)`` steps (one example per
  row when ``make_data_iterator.pack`` is False, as in the recipes).
  """
  datasets = tuple(seqio_tasks.supervised.SUPERVISED_DATASETS if datasets is None else datasets)
  unknown = [d for d in datasets if d not in paper.METRICS]
  if unknown:
    raise ValueError(f"datasets {unknown} are not MIBE datasets; known: {list(paper.METRICS)}")
  if epochs <= 0 or global_batch_size <= 0:
    raise ValueError(f"epochs={epochs} and global_batch_size={global_batch_size} must be > 0")
  test_tasks = seqio_tasks.mibe.register_mibe_tasks(data_dir, base_checkpoint, datasets=datasets,
                                                     num_shots=(0,),
                                                     prompt_variant=prompt_variant)
  mixture = seqio_tasks.supervised.register_supervised_mixture(
      data_dir=data_dir, vocabulary_path=base_checkpoint, datasets=datasets, template=template,
      prompt_variant=prompt_variant)
  examples = seqio_tasks.supervised.train_examples(mixture)
  steps = math.ceil(epochs * examples / global_batch_size)
  logging.info("supervised %s: %d training examples, %g epochs = %d steps of %d", mixture,
               examples, epochs, steps, global_batch_size)

  before = evaluate_or_read(os.path.join(out_dir, "before"), base_checkpoint, test_tasks, template,
                          step=0)
  result = loop.train(run_dir=os.path.join(out_dir, "train"), mixture=mixture,
                      init_checkpoint=base_checkpoint, global_batch_size=global_batch_size,
                      total_steps=steps)
  if result.final_model_dir is None:
    logging.warning("training stopped at step %d of %d; rerun the same command to finish",
                    result.step, steps)
    return None
  after = evaluate_or_read(os.path.join(out_dir, "after"), result.final_model_dir, test_tasks,
                         template, step=result.step)
  rows = comparison(datasets, test_tasks, before, after)
  if jax.process_index() == 0:
    summary = {"base_model": base_checkpoint, "tuned_model": result.final_model_dir,
               "adapters": result.adapters_dir, "data_dir": data_dir, "template": template,
               "prompt_variant": prompt_variant, "mixture": mixture, "train_examples": examples,
               "epochs": epochs, "global_batch_size": global_batch_size, "train_steps": steps}
    write_comparison(out_dir, summary, rows)
  logging.info("before/after table: %s", os.path.join(out_dir, RESULTS_MD))
  return rows
