"""seqio Tasks of the MIBE evaluation (12 datasets) and of MMLU, one per dataset and shot count.

Task ``mibe_{dataset}_{k}shot`` reads ``{data_dir}/{dataset}/`` (files and formats:
``medllama_jax/eval/datasets.py``) and has one split, ``test``. Its examples carry

* ``inputs``: the prompt's ids, BOS first, no EOS; ``inputs_pretokenized``: the prompt text;
* ``targets``: the answer's ids (no BOS/EOS); ``targets_pretokenized``: the answer text;
* ``index`` (position in the evaluation set), ``gold`` (JSON of the scorer's reference, which
  ``postprocess_fn`` returns for a target) and, for multiple-choice datasets, ``options`` (the
  answer strings the evaluator scores as continuations of the prompt).

Metric functions: ``release/*`` and ``fixed/*`` (``medllama_jax.eval.scorers``, on generated text)
and, for multiple choice, the score metric ``loglikelihood/*``. From gin (the eval recipes import
this module)::

  evaluate.task_names = @seqio_tasks.mibe.register_mibe_tasks()
  register_mibe_tasks.data_dir = "/data/mibe"
  register_mibe_tasks.vocabulary_path = %CHECKPOINT
  register_mibe_tasks.num_shots = (0, 5)
  register_mibe_tasks.bertscore_model_dir = "/models/bert-base-multilingual-cased"  # else n/a
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from medllama_jax.data.vocab import model_vocabulary
from medllama_jax.eval import datasets as mibe_datasets, metrics

SPLIT = "test"
DEFAULT_FEWSHOT_SEED = mibe_datasets.DEFAULT_FEWSHOT_SEED


@dataclasses.dataclass(frozen=True)
class MibeTask:
  """How a registered task was built; the evaluator writes it into results.json."""
  dataset: str
  num_shots: int
  prompt_variant: str
  fewshot_seed: int
  dataset_dir: str


# Task name → how it was built, for the Tasks this process registered.
TASKS: dict[str, MibeTask] = {}


def task_name(dataset: str, num_shots: int) -> str:
  return f"mibe_{dataset}_{num_shots}shot"


def _load_split(split: str, shuffle_files: bool, seed: int | None = None, *,
                info: MibeTask) -> tf.data.Dataset:
  del split, shuffle_files, seed  # one split, read in order
  examples = mibe_datasets.build_examples(info.dataset, info.dataset_dir, info.num_shots,
                                     info.prompt_variant, info.fewshot_seed)
  columns = {key: [example[key] for example in examples] for key in examples[0]}
  return tf.data.Dataset.from_tensor_slices(columns)


def _frame_inputs(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """The model reads a prompt as its tokenizer encodes a text: with the BOS (or other tokens) the
  tokenizer puts around it, as ``AutoTokenizer(prompt)`` gives it."""
  vocabulary = output_features["inputs"].vocabulary
  prefix = tf.constant(vocabulary.prefix_ids, tf.int32, shape=[len(vocabulary.prefix_ids)])
  suffix = tf.constant(vocabulary.suffix_ids, tf.int32, shape=[len(vocabulary.suffix_ids)])
  return dataset.map(lambda ex: {**ex, "inputs": tf.concat([prefix, ex["inputs"], suffix], axis=0)},
                     num_parallel_calls=tf.data.AUTOTUNE)


def register_mibe_task(dataset: str, data_dir: str, vocabulary: seqio.Vocabulary,
                       num_shots: int = 0, prompt_variant: str = "release",
                       fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
                       bertscore_model_dir: str | None = None) -> str:
  """Registers (or replaces) the Task of ``dataset`` with ``num_shots`` demonstrations.

  The files are checked now (a missing folder names the dataset and where to get it) and read when
  the Task's dataset is built. ``bertscore_model_dir``: the local encoder folder the summarisation
  datasets' BERTScore is computed with (checked now; without it BERTScore is ``None``).
  """
  dataset_dir = os.path.join(data_dir, dataset)
  mibe_datasets.dataset_files(dataset, dataset_dir)
  if num_shots:
    mibe_datasets.dataset_files(dataset, dataset_dir, shots=True)
  if prompt_variant not in mibe_datasets.PROMPT_VARIANTS:
    raise ValueError(f"prompt_variant must be one of {mibe_datasets.PROMPT_VARIANTS}, "
                     f"not {prompt_variant!r}")
  if bertscore_model_dir is not None and mibe_datasets.computes_bertscore(dataset):
    metrics.check_bertscore_encoder(bertscore_model_dir)
  info = MibeTask(dataset, num_shots, prompt_variant, fewshot_seed, dataset_dir)
  name = task_name(dataset, num_shots)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(functools.partial(_load_split, info=info), splits=(SPLIT,),
                                      caching_permitted=False),
      preprocessors=[functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
                     _frame_inputs],
      output_features={key: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
                       for key in ("inputs", "targets")},
      postprocess_fn=mibe_datasets.postprocess,
      metric_fns=mibe_datasets.metric_fns(dataset, bertscore_model_dir))
  TASKS[name] = info
  return name


@gin.configurable
def register_mibe_tasks(data_dir: str = gin.REQUIRED, vocabulary_path: str = gin.REQUIRED,
                        datasets: Sequence[str] | None = None, num_shots: Sequence[int] = (0,),
                        prompt_variant: str = "release",
                        fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
                        bertscore_model_dir: str | None = None) -> list[str]:
  """Registers a Task per dataset and shot count; returns their names, dataset by dataset.

  ``datasets`` defaults to the 12 MIBE datasets (``"mmlu"`` may be added by name);
  ``vocabulary_path``: a model folder (its tokenizer) or its ``tokenizer.json`` / ``tokenizer.model``;
  ``bertscore_model_dir``: see ``register_mibe_task``.
  """
  vocabulary = model_vocabulary(vocabulary_path)
  names = mibe_datasets.MIBE_DATASETS if datasets is None else tuple(datasets)
  return [register_mibe_task(dataset, data_dir, vocabulary, k, prompt_variant, fewshot_seed,
                             bertscore_model_dir)
          for dataset in names for k in num_shots]

