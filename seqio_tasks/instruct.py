"""seqio Tasks and the Mixture of Me-LLaMA's instruction tuning (the "-chat" models).

Me-LLaMA-chat was tuned for 3 epochs on ~214k samples from 15 sources (the per-source counts the
paper lists add up to 219,484); :data:`SOURCES` lists them with those counts, which are the
Mixture's default rates, so each source is drawn in proportion to its samples. Each source is one file of instruction records
(``medllama_jax.data.instruct``: the release's ``conversations`` format or single-turn
``instruction``/``input``/``output``; ``.jsonl``, ``.json`` or ``.parquet``), read by one Task.

Rendering (``medllama_jax.chat``): every record is wrapped in the chosen chat template (default
``medllama``). A source whose prompt format the release published (Alpaca/Dolly/MedInstruct,
HealthCareMagic/iCliniq) has its single-turn records' prompts written in that format inside the
wrapper; records in the ``conversations`` format already hold their formatted prompt and are only
wrapped. Tasks output ``targets`` (int32: the tokenizer's prefix (LLaMA's BOS), the pieces, EOS after
each answer) and
``loss_weights`` (float32: 1 on answer tokens and their EOS, 0 elsewhere); both are output features,
or a Mixture would drop the weights (``LlamaFeatureConverter``).

Splits: a record is in ``validation`` for a fixed fraction of ids (by hash, ``records.split_of``; a
record without an ``id`` is keyed by its file and line/index/row), else in ``train``.

Over-long examples (the rule, applied per example before packing, for ``L =
sequence_length["targets"]``; ``LlamaFeatureConverter`` rows take up to ``L`` tokens per example,
and seqio trims ``targets`` beyond that, so ``L`` is the limit):

1. drop whole exchanges (a user turn and its answer), earliest first, until the rest fits; the
   system turn and the last exchange always stay;
2. if it still does not fit, cut prompt text (the system turn's, then the user turn's and its
   context's) token by token from the left; template text stays;
3. if even the template and the answer do not fit, cut the answer's tail (its EOS included).

Examples carry the ``truncation`` feature (:data:`TRUNCATION_CODES`: the last step applied), and
every truncated example is counted per task and kind in :data:`TRUNCATIONS` (this process) and
logged by id, never text: the first :data:`LOGGED_TRUNCATIONS` of each kind, then every 1000th.

Each Task loads its file into host memory when its dataset is built (at most a few hundred MB for
the largest sources) and reads examples from there in an order shuffled over the whole file, so the
stream, its checkpointed position and its shuffling stay pure tf.data. From gin (the recipes import
this module)::

  train.mixture = @seqio_tasks.instruct.register_instruct_mixture()
  register_instruct_mixture.data_dir = "gs://bucket/instruct_data"  # {source}.jsonl|json|parquet
  register_instruct_mixture.vocabulary_path = "gs://bucket/models/me-llama-13b"
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import types
from collections.abc import Mapping, Sequence
from importlib import resources

import gin
import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from medllama_jax import chat, progress
from medllama_jax.data import instruct, records
from medllama_jax.data.vocab import model_vocabulary

AUTOTUNE = tf.data.AUTOTUNE
VALIDATION_FRACTION = 0.01
TRUNCATION_CODES = ("none", "turns_dropped", "prompt_cut", "answer_cut")
LOGGED_TRUNCATIONS = 20
TRUNCATIONS: collections.Counter[tuple[str, str]] = collections.Counter()
DEMO_SAMPLE = "instruct_sample.jsonl"


@dataclasses.dataclass(frozen=True)
class Source:
  samples: int
  prompt_format: str | None  # the release's published per-source template, if any
  description: str


SOURCES: Mapping[str, Source] = types.MappingProxyType({
    "general_conversation": Source(20_000, "alpaca_medinstruct", "Alpaca, Dolly and ShareGPT"),
    "healthcaremagic_icliniq": Source(20_000, "healthcaremagic", "HealthCareMagic and iCliniq"),
    "medinstruct": Source(52_000, "alpaca_medinstruct", "MedInstruct"),
    "medical_flash_cards": Source(34_000, None, "Medical Flash Cards"),
    "mediqa": Source(2_220, None, "MEDIQA"),
    "medicationqa": Source(690, None, "MedicationQA"),
    "liveqa": Source(634, None, "LiveQA"),
    "wikidoc_patient": Source(5_490, None, "WikiDoc patient information"),
    "guideline_qa": Source(2_000, None, "clinical guideline QA"),
    "pmc_summarization": Source(10_000, None, "PMC article summarization"),
    "pmc_next_sentence": Source(20_000, None, "PMC next-sentence generation"),
    "pmc_keyword_prediction": Source(10_000, None, "PMC keyword prediction"),
    "pubmed_causal_relation": Source(2_450, None, "PubMed causal relation detection"),
    "umls_relation_extraction": Source(10_000, None, "UMLS relation extraction"),
    "mimic_clinical": Source(30_000, None, "MIMIC-III/IV QA, summarization, classification, "
                                           "mortality"),
})

ME_LLAMA_RATES: Mapping[str, float] = types.MappingProxyType(
    {name: float(source.samples) for name, source in SOURCES.items()})


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
      "loss_weights": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                                    dtype=tf.float32),
  }


def _load_split(split: str, shuffle_files: bool, seed: int | None = None, *, path: str,
                template: chat.ChatTemplate, formatted: chat.ChatTemplate,
                validation_fraction: float) -> tf.data.Dataset:
  """The conversations of ``path`` in ``split`` as pieces: ``id``, ``segment_{text,kind,exchange}``.

  ``formatted`` renders single-turn records, ``template`` the others. The file is read whole here,
  malformed records and those the template cannot hold are skipped and counted; the dataset then
  reads the examples from memory, in an order shuffled over the whole split if ``shuffle_files``.
  """
  rejections = instruct.Rejections()
  ids, pieces_of = [], []
  for location, conversation in instruct.read_conversations(path, rejections):
    key = conversation.id or f"{os.path.basename(path)}:{location}"
    use = formatted if conversation.record_format == instruct.INSTRUCTION_FORMAT else template
    try:
      pieces = chat.segments(conversation, use)
    except instruct.InvalidConversation as e:
      rejections.add(path, location, e.reason)
      continue
    if records.split_of(key, validation_fraction) != split:
      continue
    ids.append(key)
    pieces_of.append(pieces)
  logging.info("%s (%s): %d conversations, %d records skipped %s", path, split, len(ids),
               rejections.total, dict(rejections.counts), extra=progress.FILE_ONLY)
  if not ids:
    raise ValueError(f"{path} has no usable records in split {split!r} (validation_fraction="
                     f"{validation_fraction}; skipped: {dict(rejections.counts)})")
  return pieces_dataset(ids, pieces_of, shuffle_files, seed)


def pieces_dataset(ids: Sequence[str], pieces_of: Sequence[Sequence[chat.Segment]],
                   shuffle_files: bool, seed: int | None) -> tf.data.Dataset:
  """Examples ``id``, ``segment_{text,kind,exchange}`` (what :func:`render_conversations` takes)
  held in memory and served by index, in an order shuffled over them all if ``shuffle_files``: a
  data checkpoint then stores the order, never the text."""
  ragged = functools.partial(tf.RaggedTensor.from_row_lengths,
                             row_lengths=np.asarray([len(p) for p in pieces_of], np.int64))
  flat = [piece for pieces in pieces_of for piece in pieces]
  columns = {"id": tf.constant(list(ids), tf.string),
             "segment_text": ragged(tf.constant([p.text for p in flat], tf.string)),
             "segment_kind": ragged(tf.constant([int(p.kind) for p in flat], tf.int32)),
             "segment_exchange": ragged(tf.constant([p.exchange for p in flat], tf.int32))}
  order = tf.data.Dataset.range(len(ids))
  if shuffle_files:
    order = order.shuffle(len(ids), seed=seed, reshuffle_each_iteration=True)
  return order.map(lambda i: {k: v[i] for k, v in columns.items()}, num_parallel_calls=AUTOTUNE)


class ShuffledInMemorySource(seqio.FunctionDataSource):
  """A split read whole into memory and shuffled there (:func:`pieces_dataset`), so its Task needs
  no shuffle buffer of rendered examples, which every data checkpoint would otherwise store. (seqio's
  warning that an uncached FunctionDataSource shuffles poorly does not apply.)"""

  @property
  def performs_internal_shuffling(self) -> bool:
    return True


def _note_truncation(task: str, length: int, example_id: bytes, code: np.int32,
                     num_tokens: np.int32) -> np.int32:
  """Counts and logs one truncated example (called from the tf.data graph for those only)."""
  kind = TRUNCATION_CODES[int(code)]
  TRUNCATIONS[task, kind] += 1
  count = TRUNCATIONS[task, kind]
  if count <= LOGGED_TRUNCATIONS or count % 1000 == 0:
    # The first of each kind on the console too; the count goes on in the log file.
    log = logging.warning if kind == "answer_cut" else logging.info
    log("%s: example %s has %d tokens > %d: %s (%d %s in this process)", task,
        example_id.decode("utf-8", "replace"), num_tokens, length, kind, count, kind,
        **({} if count == 1 else {"extra": progress.FILE_ONLY}))
  return code


def truncate(tokens: tf.Tensor, kinds: tf.Tensor, exchanges: tf.Tensor, length: int
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The module docstring's rule on one example: its tokens (the prefix first), each token's ``chat.Kind``
  and exchange (0 for the prefix and the system preamble), all int32 vectors → the kept tokens, their kinds
  and the truncation code (an index into :data:`TRUNCATION_CODES`)."""
  per_exchange = tf.math.bincount(exchanges, minlength=tf.reduce_max(exchanges) + 1)
  # kept[j]: tokens left when the exchanges before exchange j + 1 are dropped.
  kept = per_exchange[0] + tf.cumsum(per_exchange, reverse=True)[1:]
  fits = kept <= length
  first_fit = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32) + 1
  first = tf.where(tf.reduce_any(fits), first_fit, tf.size(kept))
  keep = (exchanges == 0) | (exchanges >= first)
  tokens, kinds = tf.boolean_mask(tokens, keep), tf.boolean_mask(kinds, keep)
  is_prompt = kinds == chat.Kind.PROMPT
  cut = is_prompt & (tf.cumsum(tf.cast(is_prompt, tf.int32)) <= tf.size(tokens) - length)
  tokens, kinds = tf.boolean_mask(tokens, ~cut), tf.boolean_mask(kinds, ~cut)
  code = tf.where(tf.size(tokens) > length, 3,
                  tf.where(tf.reduce_any(cut), 2, tf.where(first > 1, 1, 0)))
  return tokens[:length], kinds[:length], code


def render_conversations(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                         output_features: Mapping[str, seqio.Feature], task_name: str
                         ) -> tf.data.Dataset:
  """Pieces → ``targets``, ``loss_weights`` and ``truncation`` (prefix, EOS and weights as
  ``chat.encode_segments``), over-long examples cut to ``sequence_length["targets"]``."""
  vocabulary = output_features["targets"].vocabulary
  prefix, eos = list(vocabulary.prefix_ids), vocabulary.eos_id
  length = (sequence_length or {}).get("targets")

  def render(example):
    kinds, exchanges = example["segment_kind"], example["segment_exchange"]
    pieces = vocabulary.encode_tf(example["segment_text"])
    is_answer = tf.cast(kinds == chat.Kind.ANSWER, tf.int64)
    eos_rows = tf.RaggedTensor.from_row_lengths(
        tf.fill([tf.reduce_sum(is_answer)], tf.constant(eos, tf.int32)), is_answer)
    pieces = tf.concat([pieces, eos_rows], axis=1)
    rows = pieces.value_rowids()
    tokens = tf.concat([tf.constant(prefix, tf.int32, [len(prefix)]), pieces.flat_values], 0)
    token_kinds = tf.concat([tf.fill([len(prefix)], int(chat.Kind.TEMPLATE)),
                             tf.gather(kinds, rows)], 0)
    code = tf.constant(0)
    if length is not None:
      num_tokens = tf.size(tokens)
      tokens, token_kinds, code = truncate(
          tokens, token_kinds,
          tf.concat([tf.zeros([len(prefix)], exchanges.dtype), tf.gather(exchanges, rows)], 0),
          length)
      note = functools.partial(_note_truncation, task_name, length)
      code = tf.cond(code > 0,
                     lambda: tf.numpy_function(note, [example["id"], code, num_tokens], tf.int32,
                                               stateful=False),
                     lambda: code)
      code.set_shape([])
    return {"id": example["id"], "targets": tokens,
            "loss_weights": tf.cast(token_kinds == chat.Kind.ANSWER, tf.float32),
            "truncation": code}

  return dataset.map(render, num_parallel_calls=AUTOTUNE)


@gin.configurable
def register_instruct_task(name: str = gin.REQUIRED, path: str = gin.REQUIRED,
                           vocabulary_path: str = gin.REQUIRED,
                           template: str = chat.DEFAULT_TEMPLATE, prompt_format: str | None = None,
                           validation_fraction: float = VALIDATION_FRACTION) -> str:
  """Registers (or replaces) Task ``name`` over one instruction file; returns ``name``.

  ``template``: the chat template (``chat.TEMPLATES``); ``prompt_format``: a single-turn template
  that single-turn records' prompts are written in, inside ``template``. ``vocabulary_path``:
  a model folder (its tokenizer: ``tokenizer.json`` or ``tokenizer.model``) or one of those files.
  """
  wrapper = chat.get_template(template)
  formatted = wrapper if prompt_format is None else wrapper.wrap(chat.get_template(prompt_format))
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"no instruction data file {path}")
  source = ShuffledInMemorySource(
      functools.partial(_load_split, path=path, template=wrapper, formatted=formatted,
                        validation_fraction=validation_fraction),
      splits=(records.TRAIN, records.VALIDATION))
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[functools.partial(render_conversations, task_name=name)],
      output_features=output_features(model_vocabulary(vocabulary_path)), shuffle_buffer_size=None)
  return name


def source_rates(rates: Mapping[str, float] | None = None) -> dict[str, float]:
  """Source → mixing rate: ``rates[source]`` if given, else its sample count (:data:`SOURCES`)."""
  rates = {**ME_LLAMA_RATES, **(rates or {})}
  unknown = set(rates) - set(SOURCES)
  if unknown:
    raise ValueError(f"unknown instruction sources {sorted(unknown)}; known: {list(SOURCES)}")
  if any(rate < 0 for rate in rates.values()) or not any(rates.values()):
    raise ValueError(f"mixing rates {rates} must be >= 0 with at least one > 0")
  return {name: float(rate) for name, rate in rates.items()}


def source_file(data_dir: str, source: str, source_files: Mapping[str, str] | None = None) -> str:
  """``source_files[source]`` (relative to ``data_dir`` unless absolute or a URL), else the first of
  ``{data_dir}/{source}.jsonl|.json|.parquet`` that exists; raises naming the ways out if none."""
  given = (source_files or {}).get(source)
  if given is not None:
    absolute = "://" in given or os.path.isabs(given)
    candidates = [given if absolute else os.path.join(data_dir, given)]
  else:
    candidates = [os.path.join(data_dir, source + suffix) for suffix in instruct.FILE_SUFFIXES]
  for path in candidates:
    if tf.io.gfile.exists(path):
      return path
  raise FileNotFoundError(
      f"instruction source {source!r} ({SOURCES[source].description}): no "
      f"{' or '.join(candidates)}; write its records there, name its file with "
      f"source_files={{'{source}': PATH}}, or leave it out of the mixture with "
      f"rates={{'{source}': 0}}")


@gin.configurable
def register_instruct_mixture(data_dir: str = gin.REQUIRED, vocabulary_path: str = gin.REQUIRED,
                              template: str = chat.DEFAULT_TEMPLATE,
                              source_files: Mapping[str, str] | None = None,
                              rates: Mapping[str, float] | None = None,
                              mixture_name: str = "me_llama_instruct",
                              validation_fraction: float = VALIDATION_FRACTION) -> str:
  """Registers (or replaces) the instruction Mixture and its Tasks; returns the Mixture's name.

  Source ``s`` (:data:`SOURCES`) becomes Task ``{mixture_name}_{s}`` over :func:`source_file` when
  its rate (:func:`source_rates`) is positive; a source with rate 0 is left out and needs no file.
  """
  unknown = set(source_files or {}) - set(SOURCES)
  if unknown:
    raise ValueError(f"source_files names unknown sources {sorted(unknown)}; known: "
                     f"{list(SOURCES)}")
  seqio.MixtureRegistry.remove(mixture_name)
  tasks = []
  for source, rate in source_rates(rates).items():
    name = f"{mixture_name}_{source}"
    seqio.TaskRegistry.remove(name)
    if rate == 0:
      continue
    register_instruct_task(name, source_file(data_dir, source, source_files), vocabulary_path,
                           template, SOURCES[source].prompt_format, validation_fraction)
    tasks.append((name, rate))
  seqio.MixtureRegistry.add(mixture_name, tasks)
  logging.info("mixture %s (template %s): %s", mixture_name, template,
               ", ".join(f"{n} {r:g}" for n, r in tasks), extra=progress.FILE_ONLY)
  return mixture_name


@gin.configurable
def demo_sample_path() -> str:
  """The instruction sample shipped with the package (invented records, both formats)."""
  return str(resources.files("medllama_jax").joinpath("demo_data", DEMO_SAMPLE))
