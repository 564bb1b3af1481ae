"""medllama-contamination on fixtures with planted overlaps: exact fractions, stable hashes, the
decontaminated copy, errors naming the missing input.

Every test text below is invented. The MIBE folder holds PubMedQA (four 20-word contexts, 8
13-grams each; questions and answers are shorter than 13 words) and MedNLI (premises of 16, 5 and
15 words: 4, 0 and 3 13-grams; hypotheses are short). The corpora plant:

* P0's whole context, with other case, hyphens and punctuation, in a prepared corpus document;
* a 12-gram of P1 in a prepared corpus document (must not count at n = 13);
* one 13-gram of P2, with full-width letters, a ligature and a line break, in an instruction record;
* M0's premise verbatim in a prepared corpus document, and upper-cased in a raw jsonl document;
* M2's premise with one middle word changed (every 13-gram broken) and M1's short texts verbatim.

So PubMedQA: 2 of 4 examples contaminated, 9 of 32 n-grams found; MedNLI: 1 of 3, 4 of 7.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import seqio

from medllama_jax.cli import contamination as cli
from medllama_jax.contamination import eval_sets, ngrams
from medllama_jax.contamination.scan import Scanner
from medllama_jax.contamination.sources import CorpusDocument
from medllama_jax.data import records
from seqio_tasks import pretrain

ROOT = Path(__file__).resolve().parent.parent

P0 = ("Forty two adults with chronic kidney disease received oral iron daily for six months and "
      "their ferritin levels rose steadily")
P1 = ("Patients who walked briskly after dinner reported better sleep quality than those who "
      "rested on the couch every evening quietly")
P2 = ("Topical fluoride varnish applied twice yearly reduced new caries lesions in primary school "
      "children living in rural mountain districts today")
P3 = ("Nightly melatonin did not shorten the time to fall asleep among shift workers in a busy "
      "urban hospital ward overall")
M0 = ("The patient was admitted with community acquired pneumonia and treated with intravenous "
      "ceftriaxone for five days")
M1 = ("She denies fever or chills.", "She has no fever.")
M2 = ("Chest radiograph showed a small left sided pleural effusion without any focal "
      "consolidation or pneumothorax")

PLANTED_P0 = ("Background. FORTY-TWO adults with chronic kidney-disease received oral iron, daily, "
              "for six months; and their ferritin levels rose steadily! Iron was well tolerated.")
TWELVE_OF_P1 = ("Patients who walked briskly after dinner reported better sleep quality than those "
                "in the control arm.")
PLANTED_P2 = ("Answer: the \ufb02uoride \uff36\uff21\uff32\uff2e\uff29\uff33\uff28 applied\ntwice-"
              "yearly reduced NEW caries lesions in primary school children were counted.")
NEAR_MISS_M2 = M2.replace("pleural", "pericardial")

# (id, text) of the raw jsonl the prepared corpus is made from; read_jsonl ids are file:line.
PREPARED_TEXTS = [
    "Hand hygiene audits on surgical wards improved compliance over the winter months.",
    PLANTED_P0,
    TWELVE_OF_P1,
    NEAR_MISS_M2 + " Follow-up imaging was arranged.",
    " ".join(M1) + " Vital signs were stable on the ward.",
    "Admission note. " + M0 + ".",
    "Outpatient spirometry showed a mild obstructive pattern with partial reversibility.",
    "A structured exercise programme lowered fatigue scores in breast cancer survivors.",
]
PLANTED_PREPARED = {"abstracts.jsonl:2", "abstracts.jsonl:6"}
RAW_TEXTS = ["Unrelated web text about gardening and tomatoes in late summer, nothing clinical.",
             M0.upper().replace(" WITH ", ", WITH ") + "!"]
SECRET_WORDS = ("ferritin", "ceftriaxone", "fluoride", "melatonin", "pneumothorax", "gardening")


def words_of(text: str) -> int:
  return len(ngrams.words(text))


def write_jsonl(path: Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  return str(path)


def write_mibe(data_dir: Path) -> None:
  (data_dir / "pubmedqa").mkdir(parents=True)
  questions = ("Does oral iron raise ferritin?", "Does walking help sleep?",
               "Does varnish prevent caries?", "Does melatonin help shift workers?")
  pubmedqa = {str(9000 + i): {"QUESTION": q, "CONTEXTS": [context], "final_decision": answer}
              for i, (q, context, answer) in enumerate(zip(questions, (P0, P1, P2, P3),
                                                           ("yes", "no", "yes", "maybe")))}
  (data_dir / "pubmedqa" / "test_set.json").write_text(json.dumps(pubmedqa), encoding="utf-8")
  (data_dir / "mednli").mkdir()
  write_jsonl(data_dir / "mednli" / "mli_test_v1.jsonl", [
      {"sentence1": M0, "sentence2": "The patient had pneumonia.", "gold_label": "entailment"},
      {"sentence1": M1[0], "sentence2": M1[1], "gold_label": "entailment"},
      {"sentence1": M2, "sentence2": "There is no effusion.", "gold_label": "contradiction"}])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
  return write_inputs(tmp_path_factory.mktemp("contamination"))


def write_inputs(work: Path) -> dict[str, str]:
  """The MIBE folder and the corpora with the planted overlaps (module docstring), in ``work``."""
  assert [words_of(t) for t in (P0, P1, P2, P3, M0, *M1, M2)] == [20, 20, 20, 20, 16, 5, 4, 15]
  write_mibe(work / "mibe")
  raw_prepared = write_jsonl(work / "abstracts.jsonl", [{"text": t} for t in PREPARED_TEXTS])
  prepared = str(work / "data" / "pubmed_abstracts")
  records.prepare("jsonl", [raw_prepared], prepared, num_shards=2, validation_fraction=0.5)
  instruct_dir = work / "instruct"
  instruct_dir.mkdir()
  write_jsonl(instruct_dir / "mediqa.jsonl", [
      {"id": "q1", "instruction": "What lowers caries risk?", "output": PLANTED_P2},
      {"id": "q2", "conversations": [{"from": "human", "value": "Is P1 about sleep?"},
                                     {"from": "agent", "value": "Yes, " + TWELVE_OF_P1}]},
      {"id": "q3", "conversations": [{"from": "human", "value": "Only a question?"}]}])
  raw = write_jsonl(work / "web.jsonl", [{"text": t} for t in RAW_TEXTS])
  return {"work": str(work), "mibe": str(work / "mibe"), "prepared": prepared,
          "instruct": str(instruct_dir), "raw": f"jsonl:{raw}"}


def cli_args(inputs: dict[str, str], out: str, *extra: str) -> list[str]:
  return ["--data_dir", inputs["mibe"], "--tasks", "pubmedqa,mednli", "--out", out,
          "--prepared", inputs["prepared"], "--instruct", inputs["instruct"],
          "--raw", inputs["raw"], *extra]


@pytest.fixture(scope="module")
def run(inputs: dict[str, str]) -> dict:
  """One run with a small lookup batch (batches hold several documents, and documents cross
  batch boundaries) and a decontaminated copy; returns its report and where it wrote."""
  out, clean = os.path.join(inputs["work"], "report"), os.path.join(inputs["work"], "clean")
  assert cli.main(cli_args(inputs, out, "--batch_words", "5", "--write_decontaminated",
                           clean)) == 0
  with open(os.path.join(out, "contamination.json"), encoding="utf-8") as f:
    report = json.load(f)
  with open(os.path.join(out, "contamination.md"), encoding="utf-8") as f:
    markdown = f.read()
  return {"report": report, "markdown": markdown, "out": out, "clean": clean}


def test_normalisation_catches_case_punctuation_unicode_and_spacing():
  assert ngrams.words("Patient's BP:\n140/90, FORTY-two") == ngrams.words(
      "patient s bp 140 90 forty two")
  unicode = "\ufb02uoride \uff36\uff21\uff32\uff2e\uff29\uff33\uff28 Stra\u00dfe x_y"
  assert ngrams.words(unicode) == ["fluoride", "varnish", "strasse", "x", "y"]


def reference_ngram_hash(words: list[str]) -> int:
  """The module docstring's definition, in plain Python integers."""
  mask = 2**64 - 1
  total = 0
  for position, word in enumerate(words):
    z = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    z = (z + (position + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    total = (total + (z ^ (z >> 31))) & mask
  return total


def test_ngram_hashes_match_the_reference_and_are_stable_across_processes():
  text = P0 + " " + P1
  words = ngrams.words(text)
  for n in (1, 3, 13):
    expected = [reference_ngram_hash(words[i:i + n]) for i in range(len(words) - n + 1)]
    assert ngrams.texts_ngram_hashes([text], n).tolist() == expected
  assert len(ngrams.texts_ngram_hashes([" ".join(words[:12])], 13)) == 0
  # Order matters: the same words in another order hash differently.
  assert ngrams.texts_ngram_hashes(["a b"], 2)[0] != ngrams.texts_ngram_hashes(["b a"], 2)[0]
  # Pinned: hashes of an earlier run, from another process with another hash seed, stay valid.
  first = int(ngrams.texts_ngram_hashes([P0], 13)[0])
  assert first == reference_ngram_hash(ngrams.words(P0)[:13]) == 0xA15B72312DF28120
  code = ("from medllama_jax.contamination import ngrams; "
          f"print(int(ngrams.texts_ngram_hashes([{P0!r}], 13)[0]))")
  child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "12345"})
  assert int(child.stdout) == first


def test_no_ngram_spans_two_texts():
  texts = [P0, "", "too short", M0, M2[:40], P3]
  together = ngrams.texts_ngram_hashes(texts, 13)
  apart = [ngrams.texts_ngram_hashes([text], 13) for text in texts]
  assert [len(a) for a in apart] == [8, 0, 0, 4, 0, 8]
  assert together.tolist() == np.concatenate(apart).tolist()


def test_index_lists_every_example_holding_an_ngram():
  shared, other = P0, P3
  index = eval_sets.build_index({"a": [[shared], [other, shared]], "b": [[shared], ["short"]]}, 13)
  assert index.datasets == ("a", "b")
  assert index.example_ngrams.tolist() == [8, 16, 8, 0]
  assert len(index.hashes) == 16 and (index.hashes[1:] > index.hashes[:-1]).all()
  positions, found = index.lookup(ngrams.texts_ngram_hashes([shared], 13))
  assert found.all()
  hash_positions, examples = index.holders(positions)
  assert hash_positions.tolist() == np.repeat(positions, 3).tolist()
  assert examples.tolist() == [0, 1, 2] * 8
  scanner = Scanner(index, top_documents=5, batch_words=3)
  document = CorpusDocument("doc", ("Intro. " + shared, "unrelated short tail"))
  assert [overlaps for _, overlaps in scanner.scan("src", "raw", [document])] == [True]
  (match_a,), (match_b,) = scanner.top_documents(0), scanner.top_documents(1)
  assert (match_a.shared_ngrams, match_a.examples, match_b.examples) == (8, (0, 1), (0,))


def test_twelve_shared_words_count_only_when_n_is_twelve():
  document = CorpusDocument("d2", (TWELVE_OF_P1,))
  for n, expected in ((13, False), (12, True)):
    scanner = Scanner(eval_sets.build_index({"pubmedqa": [[P1]]}, n))
    assert [overlaps for _, overlaps in scanner.scan("s", "raw", [document])] == [expected]


def test_report_has_the_planted_fractions(run):
  report = run["report"]
  assert report["n"] == 13
  pubmedqa, mednli = report["datasets"]["pubmedqa"], report["datasets"]["mednli"]
  assert (pubmedqa["examples"], pubmedqa["examples_without_ngrams"],
          pubmedqa["ngrams"]) == (4, 0, 32)
  assert pubmedqa["contaminated_examples"] == 2 and pubmedqa["contaminated_indices"] == [0, 2]
  assert pubmedqa["contaminated_fraction"] == 2 / 4 and pubmedqa["ngram_fraction"] == 9 / 32
  assert (mednli["examples"], mednli["examples_without_ngrams"], mednli["ngrams"]) == (3, 1, 7)
  assert mednli["contaminated_indices"] == [0]
  assert mednli["contaminated_fraction"] == 1 / 3 and mednli["ngram_fraction"] == 4 / 7

  prepared, instruct_file = run_sources(report, "prepared"), run_sources(report, "instruction")
  raw = run_sources(report, "raw")
  assert pubmedqa["by_source"][prepared] == {
      "contaminated_examples": 1, "contaminated_fraction": 1 / 4, "ngram_fraction": 8 / 32}
  assert pubmedqa["by_source"][instruct_file] == {
      "contaminated_examples": 1, "contaminated_fraction": 1 / 4, "ngram_fraction": 1 / 32}
  assert pubmedqa["by_source"][raw]["contaminated_examples"] == 0
  for source in (prepared, raw):
    assert mednli["by_source"][source] == {
        "contaminated_examples": 1, "contaminated_fraction": 1 / 3, "ngram_fraction": 4 / 7}
  assert mednli["by_source"][instruct_file]["contaminated_examples"] == 0

  sources = report["sources"]
  assert (sources[prepared]["documents"], sources[prepared]["documents_with_overlap"]) == (8, 2)
  assert (sources[instruct_file]["documents"], sources[instruct_file]["documents_with_overlap"],
          sources[instruct_file]["rejected"]) == (2, 1, {"no_assistant_turn": 1})
  assert (sources[raw]["documents"], sources[raw]["documents_with_overlap"]) == (2, 1)
  assert sources[prepared]["words"] == sum(words_of(t) for t in PREPARED_TEXTS)

  top = [(m["source"], m["id"], m["shared_ngrams"], m["examples"], m["num_examples"])
         for m in pubmedqa["top_documents"]]
  assert top == [(prepared, "abstracts.jsonl:2", 8, [0], 1), (instruct_file, "q1", 1, [2], 1)]
  # A tie (4 shared n-grams each) lists the document read first first.
  top = [(m["source"], m["id"], m["shared_ngrams"]) for m in mednli["top_documents"]]
  assert top == [(prepared, "abstracts.jsonl:6", 4), (raw, "web.jsonl:2", 4)]
  assert "| pubmedqa | 4 | 0 | 2 | 50.00% | 28.12% |" in run["markdown"]
  assert "| mednli | 3 | 1 | 1 | 33.33% | 57.14% |" in run["markdown"]


def run_sources(report: dict, kind: str) -> str:
  (name,) = [name for name, source in report["sources"].items() if source["kind"] == kind]
  return name


def test_report_and_logs_hold_no_text(inputs, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  out = str(tmp_path / "report")
  assert cli.main(cli_args(inputs, out)) == 0
  written = "".join(Path(out, name).read_text(encoding="utf-8") for name in os.listdir(out))
  for word in SECRET_WORDS:
    assert word not in written.lower() and word not in caplog.text.lower()
  assert "pubmedqa: 2 of 4 examples contaminated" in caplog.text


def test_lookup_batch_size_does_not_change_the_report(run, inputs, tmp_path):
  out = str(tmp_path / "report")
  assert cli.main(cli_args(inputs, out)) == 0
  with open(os.path.join(out, "contamination.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert "decontaminated" not in report
  assert {**report, "decontaminated": run["report"]["decontaminated"]} == run["report"]


def task_ids(corpus_dir: str) -> dict[str, list[str]]:
  """The ids the pre-training Task's source reads from a corpus folder, per split."""
  source = seqio.TFExampleDataSource(
      split_to_filepattern=pretrain.corpus_file_patterns(corpus_dir),
      feature_description=pretrain.FEATURE_DESCRIPTION)
  return {split: [ex["id"].decode() for ex in source.get_dataset(split, shuffle=False)
                  .as_numpy_iterator()] for split in source.splits}


def test_decontaminated_copy_lacks_exactly_the_planted_documents(run, inputs):
  copy = os.path.join(run["clean"], "pubmed_abstracts")
  original, cleaned = task_ids(inputs["prepared"]), task_ids(copy)
  assert set(cleaned) == set(original) == {"train", "validation"}
  for split in original:
    # Shards are dealt anew (round-robin), so the read order across shards may differ.
    assert sorted(cleaned[split]) == sorted(set(original[split]) - PLANTED_PREPARED)
  assert set().union(*original.values()) - set().union(*cleaned.values()) == PLANTED_PREPARED
  texts = {r["id"]: r["text"] for split, pattern in pretrain.corpus_file_patterns(copy).items()
           for r in records.read_records(pattern)}
  assert texts["abstracts.jsonl:3"] == records.clean_text(TWELVE_OF_P1)

  with open(os.path.join(copy, records.STATS_FILE), encoding="utf-8") as f:
    stats = json.load(f)
  removed = stats["decontamination"]["removed"]
  assert sum(removed.values()) == 2
  for split in original:
    assert stats["records_written"][split] == len(cleaned[split])
    assert removed[split] == len(original[split]) - len(cleaned[split])
    assert sum(stats["shards"][split].values()) == len(cleaned[split])
  assert stats["decontamination"]["datasets"] == ["pubmedqa", "mednli"]
  assert stats["decontamination"]["n"] == 13
  assert run["report"]["decontaminated"][inputs["prepared"]]["removed"] == removed


def test_existing_output_folder_needs_overwrite(run, inputs, capsys):
  out = os.path.join(inputs["work"], "report2")
  assert cli.main(cli_args(inputs, out, "--write_decontaminated", run["clean"])) == 1
  assert os.path.join(run["clean"], "pubmed_abstracts") in capsys.readouterr().err
  stats_path = os.path.join(run["clean"], "pubmed_abstracts", records.STATS_FILE)
  before = Path(stats_path).read_text(encoding="utf-8")
  assert cli.main(cli_args(inputs, out, "--write_decontaminated", run["clean"],
                           "--overwrite")) == 0
  assert Path(stats_path).read_text(encoding="utf-8") == before


@pytest.mark.parametrize("broken", ["data_dir", "dataset", "prepared", "shard", "instruct", "raw"])
def test_missing_inputs_are_named(inputs, tmp_path, capsys, broken):
  args = {"mibe": inputs["mibe"], "prepared": inputs["prepared"], "instruct": inputs["instruct"],
          "raw": inputs["raw"]}
  missing = str(tmp_path / "nowhere")
  if broken == "data_dir":
    args["mibe"] = missing
  elif broken == "dataset":
    (tmp_path / "mibe").mkdir()
    args["mibe"], missing = str(tmp_path / "mibe"), str(tmp_path / "mibe" / "pubmedqa")
  elif broken == "shard":
    broken_copy = tmp_path / "pubmed_abstracts"
    broken_copy.mkdir()
    for name in os.listdir(inputs["prepared"]):
      if name != "train.tfrecord-00001-of-00002":
        (broken_copy / name).write_bytes(Path(inputs["prepared"], name).read_bytes())
    args["prepared"], missing = str(broken_copy), str(broken_copy / "train.tfrecord-00001-of-00002")
  elif broken == "raw":
    args["raw"] = "jsonl:" + missing
  else:
    args[broken] = missing
  out = str(tmp_path / "out")
  code = cli.main(["--data_dir", args["mibe"], "--tasks", "pubmedqa,mednli", "--out", out,
                   "--prepared", args["prepared"], "--instruct", args["instruct"],
                   "--raw", args["raw"]])
  assert code == 1
  assert missing in capsys.readouterr().err
  assert not os.path.exists(out)
