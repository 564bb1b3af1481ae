"""seqio Tasks and the Mixture of Me-LLaMA's continual pre-training.

Me-LLaMA continued LLaMA 2's pre-training on biomedical, clinical and general text mixed 15 : 1 : 4
(general text guards against forgetting). Each corpus is a folder written by
``scripts/prepare_corpus.py``: TFRecord shards of ``tf.train.Example`` (``text``, ``id``) per split and a
``stats.json`` whose ``file_pattern`` maps each split to its shards. Every corpus becomes a Task; the
Mixture samples them at their rates. seqio samples examples, i.e. chunks of at most one row
(``preprocessors.split_into_chunks`` runs inside each Task, before mixing), so a corpus's share of the
trained tokens is its rate times its mean tokens per example. With ``rate_unit="tokens"`` (the recipes)
the configured rates are token shares: each Task's seqio rate is its share divided by its corpus's mean
tokens per example at the training row length (``sequence_length``), from the corpus's
``token_stats.json`` (:mod:`medllama_jax.data.token_stats`; counted and written on first use when
missing). With ``rate_unit="examples"`` they are seqio's rates as given.

Each Task tokenizes and adds BOS/EOS before its ``CacheDatasetPlaceholder``, so ``seqio_cache_tasks`` can
store the tokenized corpus once, for any sequence length; chunking runs after the cache.

From gin (the module must be imported, e.g. by the training binary)::

  train.mixture = @seqio_tasks.pretrain.register_pretrain_mixture()
  register_pretrain_mixture.data_dir = "gs://bucket/pretrain_data"     # one folder per corpus
  register_pretrain_mixture.vocabulary_path = "gs://bucket/models/llama2-13b"
  register_pretrain_mixture.rate_unit = "tokens"
  register_pretrain_mixture.sequence_length = %SEQUENCE_LENGTH          # = train.sequence_length
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import types
from collections.abc import Mapping

import gin
import seqio
import tensorflow as tf
from absl import logging

from medllama_jax import progress
from medllama_jax.data import preprocessors, token_stats
from medllama_jax.data.vocab import model_vocabulary


@dataclasses.dataclass(frozen=True)
class Corpus:
  group: str
  prepare_formats: tuple[str, ...]  # the ``--format`` values of prepare_corpus.py that build it


CORPORA: Mapping[str, Corpus] = types.MappingProxyType({
    "pubmed_abstracts": Corpus("biomedical", ("pubmed_xml",)),
    "pmc_fulltext": Corpus("biomedical", ("pmc_nxml", "pmc_txt")),
    "mimic_iii_notes": Corpus("clinical", ("mimic_iii_notes",)),
    "mimic_iv_notes": Corpus("clinical", ("mimic_iv_notes",)),
    "mimic_cxr_reports": Corpus("clinical", ("mimic_cxr",)),
    "redpajama": Corpus("general", ("jsonl",)),
})

ME_LLAMA_GROUP_RATES: Mapping[str, float] = types.MappingProxyType(
    {"biomedical": 15, "clinical": 1, "general": 4})

RATE_UNITS = ("tokens", "examples")
# The split whose documents set a corpus's mean tokens per example (the mixture's rates serve every
# split; training reads this one).
RATE_SPLIT = "train"

FEATURE_DESCRIPTION = {
    "text": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
}

PREPROCESSORS = (
    functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text", "id": "id"}),
    functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
    preprocessors.frame_documents,
    seqio.CacheDatasetPlaceholder(),
    preprocessors.split_into_chunks,
)


def _prepare_command(corpus_dir: str, formats: tuple[str, ...]) -> str:
  return (f"python scripts/prepare_corpus.py --format {'|'.join(formats)} --input ... "
          f"--out {corpus_dir}")


def corpus_file_patterns(corpus_dir: str, prepare_formats: tuple[str, ...] = ("<format>",)
                         ) -> dict[str, str]:
  """Split → shard glob, from the ``stats.json`` of a prepared corpus folder.

  Patterns relative to the folder (what the preparers write, so a folder can be moved or copied to a
  bucket as a whole) are joined to it; absolute paths and URLs (``gs://...``) are kept.
  """
  stats_path = os.path.join(corpus_dir, "stats.json")
  if not tf.io.gfile.isdir(corpus_dir):
    problem = f"corpus folder {corpus_dir} does not exist"
  elif not tf.io.gfile.exists(stats_path):
    problem = f"corpus folder {corpus_dir} has no stats.json (preparation did not finish)"
  else:
    with tf.io.gfile.GFile(stats_path) as f:
      patterns = json.load(f)["file_pattern"]
    return {split: pattern if "://" in pattern or os.path.isabs(pattern)
            else os.path.join(corpus_dir, pattern) for split, pattern in patterns.items()}
  raise FileNotFoundError(f"{problem}; create it with: {_prepare_command(corpus_dir, prepare_formats)}")


def register_text_task(name: str, data_dir: str, vocabulary_path: str,
                       prepare_formats: tuple[str, ...] = ("<format>",)) -> str:
  """Registers (or replaces) Task ``name`` over the prepared corpus folder ``data_dir``; returns ``name``.

  ``prepare_formats`` only words the error raised when the folder is missing.
  """
  source = seqio.TFExampleDataSource(
      split_to_filepattern=corpus_file_patterns(data_dir, prepare_formats),
      feature_description=FEATURE_DESCRIPTION)
  vocabulary = model_vocabulary(vocabulary_path)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source, preprocessors=list(PREPROCESSORS),
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)})
  return name


def corpus_rates(group_rates: Mapping[str, float] = ME_LLAMA_GROUP_RATES,
                 task_rates: Mapping[str, float] | None = None) -> dict[str, float]:
  """Corpus → mixing rate: ``task_rates[corpus]`` if given, else its group's rate split equally.

  A group absent from ``group_rates`` has rate 0.
  """
  task_rates = dict(task_rates or {})
  group_sizes = collections.Counter(c.group for c in CORPORA.values())
  unknown = (set(group_rates) - set(group_sizes)) | (set(task_rates) - set(CORPORA))
  if unknown:
    known = {name: c.group for name, c in CORPORA.items()}
    raise ValueError(f"unknown groups/corpora {sorted(unknown)}; corpora and their groups: {known}")
  rates = {name: float(task_rates[name]) if name in task_rates
           else float(group_rates.get(c.group, 0)) / group_sizes[c.group]
           for name, c in CORPORA.items()}
  if any(rate < 0 for rate in rates.values()) or not any(rates.values()):
    raise ValueError(f"mixing rates {rates} must be >= 0 with at least one > 0")
  return rates


def token_rates(shares: Mapping[str, float], corpus_dirs: Mapping[str, str], vocabulary_path: str,
                sequence_length: int) -> dict[str, float]:
  """Corpus → seqio rate that makes its share of the trained tokens proportional to ``shares[corpus]``.

  seqio draws examples in proportion to their rates, so tokens come in proportion to rate × mean tokens
  per example; dividing each share by that mean (at rows of ``sequence_length``) makes the token shares
  the configured ones. ``corpus_dirs`` maps the corpora with a positive share to their folders.
  """
  vocabulary = model_vocabulary(vocabulary_path)
  rates = {}
  for corpus, share in shares.items():
    stats = token_stats.token_stats(corpus_dirs[corpus], vocabulary)
    try:
      per_example = token_stats.tokens_per_example(
          token_stats.split_histogram(stats, RATE_SPLIT), sequence_length)
    except ValueError as e:
      raise ValueError(f"{corpus_dirs[corpus]} ({RATE_SPLIT} split): {e}") from e
    rates[corpus] = share / per_example
  return rates


@gin.configurable
def register_pretrain_mixture(data_dir: str = gin.REQUIRED, vocabulary_path: str = gin.REQUIRED,
                              group_rates: Mapping[str, float] = ME_LLAMA_GROUP_RATES,
                              task_rates: Mapping[str, float] | None = None,
                              mixture_name: str = "me_llama_pretrain", rate_unit: str = "examples",
                              sequence_length: int | None = None) -> str:
  """Registers (or replaces) the pre-training Mixture and its Tasks; returns the Mixture's name.

  Corpus ``c`` is read from ``{data_dir}/{c}`` as Task ``{mixture_name}_{c}`` when its rate (see
  :func:`corpus_rates`; ``task_rates`` is keyed by corpus name) is positive; a corpus with rate 0 is
  left out and needs no folder. ``vocabulary_path``: a model folder
  (its tokenizer) or its ``tokenizer.json`` / ``tokenizer.model``.

  ``rate_unit="tokens"``: the rates are shares of the trained tokens (:func:`token_rates`), which needs
  the training row length ``sequence_length`` (bind it to the value of ``train.sequence_length``);
  ``"examples"``: the rates are seqio's, shares of the examples (chunks).
  """
  if rate_unit not in RATE_UNITS:
    raise ValueError(f"rate_unit {rate_unit!r}: one of {RATE_UNITS}")
  if rate_unit == "tokens" and sequence_length is None:
    raise ValueError("rate_unit='tokens' needs the training row length: bind "
                     "register_pretrain_mixture.sequence_length to train.sequence_length's value")
  rates = corpus_rates(group_rates, task_rates)
  seqio.MixtureRegistry.remove(mixture_name)
  tasks = {}
  for corpus, rate in rates.items():
    name = f"{mixture_name}_{corpus}"
    seqio.TaskRegistry.remove(name)
    if rate == 0:
      continue
    corpus_dir = os.path.join(data_dir, corpus)
    try:
      register_text_task(name, corpus_dir, vocabulary_path, CORPORA[corpus].prepare_formats)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}; or leave {corpus} out of the mixture with a rate of 0 "
                              f"(task_rates={{'{corpus}': 0}})") from e
    tasks[corpus] = (name, corpus_dir)
  shares = {corpus: rates[corpus] for corpus in tasks}
  if rate_unit == "tokens":
    rates = token_rates(shares, {c: d for c, (_, d) in tasks.items()}, vocabulary_path,
                        sequence_length)
  seqio.MixtureRegistry.add(mixture_name, [(name, rates[c]) for c, (name, _) in tasks.items()])
  logging.info("mixture %s (rates in %s): %s", mixture_name, rate_unit,
               ", ".join(f"{name} share {shares[c]:g} rate {rates[c]:.4g}"
                         for c, (name, _) in tasks.items()), extra=progress.FILE_ONLY)
  return mixture_name
