"""seqio Tasks of the supervised setting: a MIBE dataset's training split as instruction data.

The paper fine-tunes its models on the training splits of the MIBE datasets and evaluates them on
the test splits. Each training record becomes one exchange of the chat template: the user turn is
the dataset's evaluation prompt (``medllama_jax.eval.datasets``: zero-shot, the ``release`` variant
unless chosen otherwise) and the assistant turn is the record's ``answer``, the text the scorers
expect. Rendering, loss weights and the rule for over-long examples are instruction tuning's
(``seqio_tasks.instruct.render_conversations``): ``targets`` is BOS, the template and prompt
pieces, the answer and its EOS; ``loss_weights`` is 1 exactly on the answer and its EOS. Prompted
this way, the tuned model is asked at test time (``medllama-eval --chat_template``) with the very
ids it was trained to answer after.

Task ``{mixture_name}_{dataset}`` reads the few-shot pool files of ``{data_dir}/{dataset}/`` (the
training files, see ``datasets.SPECS``) into memory when its dataset is built and serves them in
an order shuffled over the whole split. Splits: ``validation`` holds a fixed fraction of records
by hash of ``{dataset}/{index}`` (``records.split_of``), ``train`` the rest.

The Mixture defaults to :data:`SUPERVISED_DATASETS` with each dataset drawn in proportion to its
number of training examples, so that sampling it is a shuffled concatenation of the training sets.
From gin::

  train.mixture = @seqio_tasks.supervised.register_supervised_mixture()
  register_supervised_mixture.data_dir = "/data/mibe"
  register_supervised_mixture.vocabulary_path = "/models/me-llama-13b"
  register_supervised_mixture.datasets = ["pubmedqa"]  # one dataset; default: the eight
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Mapping, Sequence
from importlib import resources

import gin
import seqio
import tensorflow as tf
from absl import logging

from medllama_jax import chat, progress
from medllama_jax.data import records
from medllama_jax.data.instruct import ASSISTANT, USER, Conversation, Turn
from medllama_jax.data.vocab import model_vocabulary
from medllama_jax.eval import datasets as mibe_datasets
from seqio_tasks import instruct

# Our choice of default: the eight MIBE datasets whose training splits are openly distributed
# (emrQA, i2b2, MIMIC-CXR and MedNLI need credentialed access). Any MIBE dataset can be named.
SUPERVISED_DATASETS: tuple[str, ...] = ("pubmedqa", "medqa", "medmcqa", "ddi", "hoc", "mtsample",
                                        "pubmed_summarization", "bionli")
DEFAULT_MIXTURE = "me_llama_supervised"
SPLITS = (records.TRAIN, records.VALIDATION)


@dataclasses.dataclass(frozen=True)
class SupervisedTask:
  """How a registered Task was built, and how many examples each split holds."""
  dataset: str
  dataset_dir: str
  prompt_variant: str
  template: str
  validation_fraction: float
  num_examples: Mapping[str, int]


# Task name → how it was built, for the Tasks this process registered.
TASKS: dict[str, SupervisedTask] = {}


def conversation(record: mibe_datasets.Record, dataset: str, prompt_variant: str = "release",
                 example_id: str | None = None) -> Conversation:
  """One training record as an exchange: the evaluation prompt, then the answer."""
  prompt = mibe_datasets.get_spec(dataset).prompt(record, prompt_variant)
  return Conversation((Turn(USER, prompt), Turn(ASSISTANT, record["answer"])), id=example_id)


def _example_id(dataset: str, index: int) -> str:
  return f"{dataset}/{index}"


def _split_records(dataset: str, dataset_dir: str, validation_fraction: float
                   ) -> dict[str, list[tuple[str, mibe_datasets.Record]]]:
  """Split → (id, record) of the training files, in file order."""
  out: dict[str, list[tuple[str, mibe_datasets.Record]]] = {split: [] for split in SPLITS}
  for index, record in enumerate(mibe_datasets.read_records(dataset, dataset_dir, shots=True)):
    example_id = _example_id(dataset, index)
    out[records.split_of(example_id, validation_fraction)].append((example_id, record))
  return out


def _load_split(split: str, shuffle_files: bool, seed: int | None = None, *,
                info: SupervisedTask) -> tf.data.Dataset:
  """The split's examples as chat pieces (``id``, ``segment_{text,kind,exchange}``), in memory
  (``instruct.pieces_dataset``)."""
  keyed = _split_records(info.dataset, info.dataset_dir, info.validation_fraction)[split]
  if not keyed:
    raise ValueError(f"supervised {info.dataset} ({info.dataset_dir}): no examples in split "
                     f"{split!r} (validation_fraction={info.validation_fraction})")
  template = chat.get_template(info.template)
  pieces = [chat.segments(conversation(record, info.dataset, info.prompt_variant, example_id),
                          template) for example_id, record in keyed]
  return instruct.pieces_dataset([example_id for example_id, _ in keyed], pieces, shuffle_files,
                                 seed)


def task_name(dataset: str, mixture_name: str = DEFAULT_MIXTURE) -> str:
  return f"{mixture_name}_{dataset}"


@gin.configurable
def register_supervised_task(dataset: str = gin.REQUIRED, data_dir: str = gin.REQUIRED,
                             vocabulary_path: str = gin.REQUIRED,
                             template: str = chat.DEFAULT_TEMPLATE,
                             prompt_variant: str = "release", validation_fraction: float = 0.0,
                             name: str | None = None) -> str:
  """Registers (or replaces) the Task over ``dataset``'s training split; returns its name
  (``name``, default :func:`task_name`). The files are read now to count each split (the
  mixture's rates and the runner's epochs need the counts; they are kept in :data:`TASKS`, not
  given to seqio, which would cache a small split in memory after its first shuffled pass and
  repeat that order every epoch) and read again when the Task's dataset is built."""
  if prompt_variant not in mibe_datasets.PROMPT_VARIANTS:
    raise ValueError(f"prompt_variant must be one of {mibe_datasets.PROMPT_VARIANTS}, not "
                     f"{prompt_variant!r}")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  chat.get_template(template)
  dataset_dir = os.path.join(data_dir, dataset)
  counts = {split: len(keyed) for split, keyed in
            _split_records(dataset, dataset_dir, validation_fraction).items()}
  info = SupervisedTask(dataset, dataset_dir, prompt_variant, template, validation_fraction,
                        types.MappingProxyType(counts))
  name = name or task_name(dataset)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=instruct.ShuffledInMemorySource(functools.partial(_load_split, info=info),
                                             splits=SPLITS, caching_permitted=False),
      preprocessors=[functools.partial(instruct.render_conversations, task_name=name)],
      output_features=instruct.output_features(model_vocabulary(vocabulary_path)),
      shuffle_buffer_size=None)
  TASKS[name] = info
  logging.info("%s: %s training examples of %s (%s)", name, counts, dataset, dataset_dir)
  return name


def dataset_rates(datasets: Sequence[str], counts: Mapping[str, int],
                  rates: Mapping[str, float] | None = None) -> dict[str, float]:
  """Dataset → mixing rate: ``rates[dataset]`` if given, else its training examples."""
  unknown = set(rates or {}) - set(datasets)
  if unknown:
    raise ValueError(f"rates name datasets {sorted(unknown)} that are not in the mixture "
                     f"{list(datasets)}")
  out = {dataset: float((rates or {}).get(dataset, counts[dataset])) for dataset in datasets}
  if any(rate < 0 for rate in out.values()) or not any(out.values()):
    raise ValueError(f"mixing rates {out} must be >= 0 with at least one > 0")
  return out


@gin.configurable
def register_supervised_mixture(data_dir: str = gin.REQUIRED, vocabulary_path: str = gin.REQUIRED,
                                datasets: Sequence[str] | None = None,
                                template: str = chat.DEFAULT_TEMPLATE,
                                prompt_variant: str = "release",
                                rates: Mapping[str, float] | None = None,
                                mixture_name: str = DEFAULT_MIXTURE,
                                validation_fraction: float = 0.0) -> str:
  """Registers (or replaces) the Mixture of ``datasets`` (default :data:`SUPERVISED_DATASETS`)
  and a Task per dataset (:func:`register_supervised_task`); returns the Mixture's name. Rates:
  :func:`dataset_rates`; a dataset with rate 0 is left out."""
  datasets = tuple(SUPERVISED_DATASETS if datasets is None else datasets)
  if not datasets or len(set(datasets)) != len(datasets):
    raise ValueError(f"datasets {list(datasets)} must be distinct and at least one")
  for dataset in datasets:
    mibe_datasets.get_spec(dataset)
  seqio.MixtureRegistry.remove(mixture_name)
  names = {dataset: register_supervised_task(dataset, data_dir, vocabulary_path, template,
                                             prompt_variant, validation_fraction,
                                             task_name(dataset, mixture_name))
           for dataset in datasets}
  counts = {dataset: TASKS[name].num_examples[records.TRAIN] for dataset, name in names.items()}
  tasks = [(names[d], rate) for d, rate in dataset_rates(datasets, counts, rates).items() if rate]
  seqio.MixtureRegistry.add(mixture_name, tasks)
  logging.info("mixture %s (template %s, %s prompts): %s", mixture_name, template, prompt_variant,
               ", ".join(f"{n} {r:g}" for n, r in tasks), extra=progress.FILE_ONLY)
  return mixture_name


def train_examples(mixture_or_task_name: str) -> int:
  """Training examples of a Task or Mixture registered here (its Tasks with a positive rate)."""
  if mixture_or_task_name in TASKS:
    return TASKS[mixture_or_task_name].num_examples[records.TRAIN]
  mixture = seqio.get_mixture_or_task(mixture_or_task_name)
  if not isinstance(mixture, seqio.Mixture):
    raise ValueError(f"{mixture_or_task_name!r} was not registered by seqio_tasks.supervised")
  return sum(train_examples(task.name) for task in mixture.tasks)


@gin.configurable
def demo_data_dir() -> str:
  """The MIBE samples shipped with the package (a few invented training and test records of
  every dataset), the demo recipe's ``DATA_DIR``."""
  return str(resources.files("medllama_jax").joinpath("demo_data", "mibe"))
