"""Pre-training data end to end on fixture corpora: vocabulary, Tasks, the 15:1:4 Mixture, the iterator.

The corpus folders imitate ``scripts/prepare_corpus.py`` output (TFRecord shards of ``text``/``id``
examples and a ``stats.json`` with ``file_pattern``) and are written here, so the test does not depend on
the preparers. Documents are lines of the packaged demo text; the tokenizer is trained on the same text.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import jax
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from medllama_jax import partitioning
from medllama_jax.data.pipeline import global_batch, make_data_iterator
from medllama_jax.data.vocab import model_vocabulary
from medllama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from seqio_tasks.pretrain import CORPORA, register_pretrain_mixture, register_text_task

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
VOCAB_SIZE = 512
TRAIN_DOCS, VALIDATION_DOCS, TRAIN_FILES = 12, 4, 2
# 2,000 draws: the binomial standard deviation of a fraction is at most 0.011, so 0.035 is > 3 sigma.
NUM_SAMPLES, TOLERANCE = 2000, 0.035
LENGTH, BATCH = 64, 8

DEMO_LINES = (resources.files("medllama_jax") / "demo_data" / "medical_notes.txt").read_text(
    encoding="utf-8").splitlines()
# corpus -> split -> [(id, text)]; every corpus gets its own lines, ids say which corpus they are from.
DOCUMENTS = {
    corpus: {
        "train": [(f"{corpus}/{i}", DEMO_LINES[k * 16 + i]) for i in range(TRAIN_DOCS)],
        "validation": [(f"{corpus}/{i}", DEMO_LINES[k * 16 + i])
                       for i in range(TRAIN_DOCS, TRAIN_DOCS + VALIDATION_DOCS)],
    }
    for k, corpus in enumerate(CORPORA)
}


def write_corpus(folder: Path, documents: dict[str, list[tuple[str, str]]], relative: bool) -> None:
  """What the preparers write: ``{split}.tfrecord-{i:05d}-of-{n:05d}`` shards and ``stats.json``.

  ``file_pattern`` holds globs relative to the folder if ``relative``, else absolute ones.
  """
  folder.mkdir(parents=True)
  patterns = {}
  for split, docs in documents.items():
    num_files = TRAIN_FILES if split == "train" else 1
    for i in range(num_files):
      with tf.io.TFRecordWriter(str(folder / f"{split}.tfrecord-{i:05d}-of-{num_files:05d}")) as w:
        for doc_id, text in docs[i::num_files]:
          feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
                     for k, v in (("text", text), ("id", doc_id))}
          w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    pattern = f"{split}.tfrecord-?????-of-{num_files:05d}"
    patterns[split] = pattern if relative else str(folder / pattern)
  stats = {"file_pattern": patterns, "documents": {s: len(d) for s, d in documents.items()}}
  (folder / "stats.json").write_text(json.dumps(stats))


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory: pytest.TempPathFactory) -> str:
  work = tmp_path_factory.mktemp("vocab")
  model = train_sentencepiece(str(resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"),
                              work / "tok", VOCAB_SIZE)
  shutil.copyfile(model, work / "tokenizer.model")
  return str(work / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(vocab_path: str) -> Tokenizer:
  return load_tokenizer(os.path.dirname(vocab_path))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  root = tmp_path_factory.mktemp("pretrain_data")
  for corpus, documents in DOCUMENTS.items():
    write_corpus(root / corpus, documents, relative=False)
  return root


@pytest.fixture(scope="module")
def partial_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """Biomedical and general corpora only (no clinical folders), with relative file patterns."""
  root = tmp_path_factory.mktemp("partial_data")
  for corpus, documents in DOCUMENTS.items():
    if CORPORA[corpus].group != "clinical":
      write_corpus(root / corpus, documents, relative=True)
  return root


@pytest.fixture(scope="module")
def mixture(data_dir: Path, vocab_path: str) -> str:
  return register_pretrain_mixture(str(data_dir), vocab_path)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return list(itertools.islice(iterator, n))


def assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in FEATURES:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_vocabulary_follows_llama_conventions(vocab_path: str, sp: Tokenizer):
  vocab = model_vocabulary(vocab_path)
  assert (vocab.vocab_size, vocab.extra_ids) == (VOCAB_SIZE, 0)
  assert (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 1, 2, 0)
  text = "Troponin rose from 0.02 to 0.85 ng/mL over 3 hours."
  ids = sp.encode(text, add_special_tokens=False)
  assert ids[0] not in (1, 2) and ids[-1] not in (1, 2)
  assert list(vocab.encode(text)) == ids  # no BOS, no EOS
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  assert model_vocabulary(os.path.dirname(vocab_path)) == vocab  # a model folder works too


def test_unigram_sentencepiece_model_is_rejected(tmp_path: Path):
  spm.SentencePieceTrainer.train(  # T5's tokenizer: a unigram model, PAD 0, EOS 1, UNK 2, no BOS
      input=str(resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"),
      model_prefix=str(tmp_path / "tokenizer"), vocab_size=VOCAB_SIZE, character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  with pytest.raises(ValueError, match=r"tokenizer\.model: a SentencePiece model of type 1; LLaMA"):
    model_vocabulary(str(tmp_path / "tokenizer.model"))


def test_task_yields_bos_document_eos(data_dir: Path, vocab_path: str, sp: Tokenizer):
  task = seqio.get_mixture_or_task(
      register_text_task("test_pubmed", str(data_dir / "pubmed_abstracts"), vocab_path))
  expected = {doc_id: [1] + sp.encode(text, add_special_tokens=False) + [2]
              for doc_id, text in DOCUMENTS["pubmed_abstracts"]["validation"]}
  dataset = task.get_dataset({"targets": 4096}, split="validation", shuffle=False)
  assert {ex["id"].decode(): ex["targets"].tolist() for ex in dataset.as_numpy_iterator()} == expected
  # What seqio_cache_tasks would store: whole tokenized documents, independent of the row length.
  assert task.supports_caching
  cached = task.preprocess_precache(task.source.get_dataset("validation", shuffle=False))
  assert {ex["id"].decode(): ex["targets"].tolist() for ex in cached.as_numpy_iterator()} == expected


def sample_fractions(mixture_name: str) -> dict[str, float]:
  """Fraction of each corpus among the mixture's first NUM_SAMPLES examples (chunks).

  Unshuffled (quicker: no shuffle buffers to fill); the seeded mixture sampling is what is measured.
  """
  dataset = seqio.get_mixture_or_task(mixture_name).get_dataset(
      {"targets": LENGTH}, split="train", shuffle=False, seed=0, passthrough_features=["id"])
  counts = collections.Counter(ex["id"].decode().split("/")[0]
                               for ex in dataset.take(NUM_SAMPLES).as_numpy_iterator())
  return {corpus: n / NUM_SAMPLES for corpus, n in counts.items()}


def assert_fractions(fractions: dict[str, float], rates: dict[str, float]) -> None:
  total = sum(rates.values())
  assert set(fractions) == set(rates)
  for corpus, rate in rates.items():
    assert abs(fractions[corpus] - rate / total) < TOLERANCE, (corpus, fractions, rates)


def test_mixture_is_15_1_4_split_equally_within_groups(mixture: str):
  per_corpus = {"biomedical": 15 / 2, "clinical": 1 / 3, "general": 4.0}
  rates = {corpus: per_corpus[CORPORA[corpus].group] for corpus in CORPORA}
  registered = seqio.get_mixture_or_task(mixture)
  assert {t.name: registered.get_rate(t) for t in registered.tasks} == {
      f"me_llama_pretrain_{c}": pytest.approx(r) for c, r in rates.items()}
  fractions = sample_fractions(mixture)
  assert_fractions(fractions, rates)
  groups = collections.defaultdict(float)
  for corpus, fraction in fractions.items():
    groups[CORPORA[corpus].group] += fraction
  for group, share in (("biomedical", 0.75), ("clinical", 0.05), ("general", 0.2)):
    assert abs(groups[group] - share) < TOLERANCE, groups


def test_rates_can_be_overridden_and_rate_0_needs_no_folder(partial_data_dir: Path, vocab_path: str):
  name = register_pretrain_mixture(str(partial_data_dir), vocab_path,
                                   group_rates={"biomedical": 1, "clinical": 0, "general": 1},
                                   task_rates={"pmc_fulltext": 3}, mixture_name="override_mix")
  rates = {"pubmed_abstracts": 0.5, "pmc_fulltext": 3.0, "redpajama": 1.0}
  registered = seqio.get_mixture_or_task(name)
  assert {t.name: registered.get_rate(t) for t in registered.tasks} == {
      f"override_mix_{c}": r for c, r in rates.items()}
  assert_fractions(sample_fractions(name), rates)
  # Registering again replaces the mixture and drops the tasks it no longer uses.
  register_pretrain_mixture(str(partial_data_dir), vocab_path, group_rates={"general": 2},
                            mixture_name="override_mix")
  assert [t.name for t in seqio.get_mixture_or_task(name).tasks] == ["override_mix_redpajama"]
  assert "override_mix_pmc_fulltext" not in seqio.TaskRegistry.names()


def test_missing_corpus_folder_says_how_to_make_it_or_leave_it_out(partial_data_dir: Path,
                                                                    vocab_path: str):
  folder = partial_data_dir / "mimic_iii_notes"
  with pytest.raises(FileNotFoundError) as error:
    register_pretrain_mixture(str(partial_data_dir), vocab_path, mixture_name="missing_mix")
  message = str(error.value)
  assert f"corpus folder {folder} does not exist" in message
  assert (f"python scripts/prepare_corpus.py --format mimic_iii_notes --input ... --out {folder}"
          in message)
  assert "rate of 0 (task_rates={'mimic_iii_notes': 0})" in message
  (partial_data_dir / "unfinished").mkdir()
  with pytest.raises(FileNotFoundError, match="unfinished has no stats.json"):
    register_text_task("unfinished", str(partial_data_dir / "unfinished"), vocab_path)
  with pytest.raises(ValueError, match="unknown groups/corpora \\['pubmed'\\]"):
    register_pretrain_mixture(str(partial_data_dir), vocab_path, task_rates={"pubmed": 1})


@pytest.fixture(scope="module")
def first_batches(mixture: str) -> list[dict[str, np.ndarray]]:
  """The first three batches of the mixture with seed 0, on one shard."""
  return take(make_data_iterator(mixture, LENGTH, BATCH, seed=0), 3)


def test_iterator_batches(first_batches: list[dict[str, np.ndarray]]):
  for batch in first_batches:
    assert set(batch) == set(FEATURES)
    for k in FEATURES:
      assert batch[k].shape == (BATCH, LENGTH)
      assert batch[k].dtype == (np.float32 if k == "decoder_loss_weights" else np.int32)
    real = batch["decoder_segment_ids"] > 0
    np.testing.assert_array_equal(batch["decoder_loss_weights"], real.astype(np.float32))
    assert (batch["decoder_segment_ids"][:, 0] == 1).all()
    assert (batch["decoder_positions"][:, 0] == 0).all()
    assert (batch["decoder_input_tokens"][~real] == 0).all()
    assert (batch["decoder_target_tokens"][~real] == 0).all()
  assert any((b["decoder_segment_ids"] >= 2).any() for b in first_batches)  # rows are packed


def test_iterator_is_a_function_of_the_seed(mixture: str, first_batches: list[dict[str, np.ndarray]]):
  assert_same_batches(take(make_data_iterator(mixture, LENGTH, BATCH, seed=0), 3), first_batches)
  other = take(make_data_iterator(mixture, LENGTH, BATCH, seed=1), 3)
  assert any((a[k] != b[k]).any() for a, b in zip(first_batches, other) for k in FEATURES)


def test_restored_iterator_continues_exactly(mixture: str, tmp_path: Path):
  iterator = make_data_iterator(mixture, LENGTH, BATCH, seed=5)
  take(iterator, 2)
  iterator.save(str(tmp_path))
  assert (tmp_path / "shard_0-of-1").is_dir()
  expected = take(iterator, 3)
  restored = make_data_iterator(mixture, LENGTH, BATCH, seed=5)
  restored.restore(str(tmp_path))
  assert_same_batches(take(restored, 3), expected)
  with pytest.raises(FileNotFoundError, match="shard_0-of-1"):
    restored.restore(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("split", ["train", "validation"])  # sharded by file / by example
def test_shards_read_disjoint_documents(data_dir: Path, vocab_path: str,
                                        sp: Tokenizer, split: str):
  task = register_text_task("test_redpajama", str(data_dir / "redpajama"), vocab_path)
  doc_of = {tuple([1] + sp.encode(text, add_special_tokens=False) + [2]): doc_id
            for doc_id, text in DOCUMENTS["redpajama"][split]}
  length = 256
  assert max(map(len, doc_of)) <= length  # one row per document
  seen = []
  for index in range(2):
    rows = [dict(zip(b, r)) for b in make_data_iterator(task, length, 4, split=split, shuffle=False,
                                                         num_epochs=1, pack=False, shard_index=index,
                                                         num_shards=2)
            for r in zip(*b.values())]
    docs = {doc_of[tuple(r["decoder_input_tokens"][r["decoder_segment_ids"] > 0].tolist() + [2])]
            for r in rows}
    assert len(docs) == len(rows)
    seen.append(docs)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {doc_id for doc_id, _ in DOCUMENTS["redpajama"][split]}


def test_global_batch_is_sharded_over_the_data_axes(first_batches: list[dict[str, np.ndarray]]):
  mesh, rules = partitioning.make_mesh(2, 2, 2), partitioning.logical_axis_rules()
  local = first_batches[0]
  batch = global_batch(local, mesh, rules)
  sharding = partitioning.batch_sharding(mesh, rules)
  assert set(batch) == set(FEATURES)
  for k, array in batch.items():
    assert isinstance(array, jax.Array)
    assert array.sharding == sharding and array.shape == (BATCH, LENGTH)
    assert array.dtype == local[k].dtype
    np.testing.assert_array_equal(np.asarray(array), local[k])
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      assert shard.data.shape == (BATCH // 4, LENGTH)  # batch split 4 ways (data × fsdp)
      np.testing.assert_array_equal(np.asarray(shard.data), local[k][shard.index])
