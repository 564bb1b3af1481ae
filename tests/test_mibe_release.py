"""The release's own MIBE test sets (parquet rows ``{id, query, answer, choices, gold}``): the
prompts rebuilt from raw data must equal the stored ``query`` strings, and ``prepare_mibe.py
DATASET --release_parquet`` must give an evaluation set whose prompts are those queries and whose
targets are the gold. Raw inputs are small files in each public layout (invented text); each
parquet file is laid out as the release ships it, its queries the release's templates filled by
hand (the text of /work/shared/ME_LLAMA.md; HoC's, which that file only outlines, from the
release's src/preprocess_instruct.py)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio

from medllama_jax.eval import datasets, scorers
from medllama_jax.eval.raw import SUMMARY_FILE, prepare
from medllama_jax.tokenizer import train_sentencepiece
from seqio_tasks.mibe import register_mibe_tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]

PUBMEDQA = ("As an expert doctor in clinical science and medical knowledge, can you tell me if the "
            "following statement is correct? Answer yes, no, or maybe.\n{contexts}\n{question}\n"
            "The answer is:")
MEDQA = ("You are a medical doctor taking the US Medical Licensing Examination. You need to "
         "demonstrate your understanding of basic and clinical science, medical knowledge, and "
         "mechanisms underlying health, disease, patient care, and modes of therapy. Show your "
         "ability to apply the knowledge essential for medical practice. For the following "
         "multiple-choice question, select one correct answer from A to E. Base your answer on the "
         "current and standard practices referenced in medical guidelines.\nQuestion: {question}"
         "\n\nOptions:\n{options}\n\nThe answer is")
MEDNLI = ("TASK: Please classify the relationship between the given premise and hypothesis into "
          "one of the following labels: entailment, contradiction, or neutral. Return only the "
          "label.\n###\nINPUT: [PRE] {sentence1} [HYP] {sentence2}\nOUTPUT:")
HOC = ("The task is to decide the Hallmarks of Cancer (HOC) taxonomy of the article based on its "
       "abstract. The input is an abstract text. There are 10 topics you will need to decide "
       "whether the article is related to. Topics: sustaining proliferative signaling, evading "
       "growth suppressors, resisting cell death, enabling replicative immortality, inducing "
       "angiogenesis, activating invasion and metastasis, genomic instability and mutation, tumor "
       "promoting inflammation, cellular energetics, avoiding immune destruction. The output "
       "should be topics from the above 10 topics, that are related to the input article. Please "
       "note one article can be related to multiple topics. Output format: provide a "
       "semicolon-separated list of relevant topics.\n    ###\n    INPUT: {text}\n    OUTPUT:")
EMRQA = ("TASK: Given a medical context and an open-ended question related to it, extract the "
         "relevant text segment from the context as an answer. Expected output: Only extract and "
         "return the text segment from the provided context that directly answers the question. "
         "Do not add any new words.\n###\nContext: {context}\nQuestion {question}\nAnswer:")

# The release's choices (src/preprocess_instruct.py), in its order.
CHOICES = {"pubmedqa": ["yes", "no", "maybe"], "medqa": ["A", "B", "C", "D", "E"],
           "mednli": ["entailment", "contradiction", "neutral"], "hoc": list(scorers.HOC_LABELS)}


def write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def jsonl(rows: list[dict]) -> str:
  return "".join(json.dumps(row) + "\n" for row in rows)


def write_parquet(path: pathlib.Path, rows: list[dict], schema: pa.Schema | None = None) -> str:
  """Rows as the release pushed them (the ``datasets`` parquet export: these columns, one table)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
  return str(path)


def release_rows(name: str, items: list[tuple[str, object]]) -> list[dict]:
  """Classification / multi-label rows: ``gold`` indexes ``choices`` or flags each of them."""
  choices = CHOICES[name]
  rows = []
  for index, (query, answer) in enumerate(items):
    gold = ([int(c in answer) for c in choices] if isinstance(answer, list)
            else choices.index(answer))
    rows.append({"id": f"{name}{index}", "query": query,
                 "answer": ";".join(answer) if isinstance(answer, list) else answer,
                 "choices": choices, "gold": gold})
  return rows


# --------------------------------------------------------------------------------------------------
# Raw data in each public layout, and the release's queries for the same items.


def pubmedqa_raw(folder: pathlib.Path) -> list[dict]:
  """PubMedQA's test_set.json (preprocess/split_dataset.py): PMID → its PQA-L record."""
  items = {
      "21645374": {"QUESTION": "Do mitochondria play a role in remodelling lace plant leaves "
                               "during programmed cell death?",
                   "CONTEXTS": ["Programmed cell death (PCD) is the regulated death of cells.",
                                "The lace plant forms perforations by PCD."],
                   "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": ["Apoptosis"],
                   "YEAR": "2011", "reasoning_required_pred": "yes",
                   "reasoning_free_pred": "yes", "final_decision": "yes",
                   "LONG_ANSWER": "Results suggest a role."},
      "16418930": {"QUESTION": "Is a short hospital stay after surgery safe",
                   "CONTEXTS": ["Four hundred patients were followed for 30 days."],
                   "LABELS": ["METHODS"], "MESHES": [], "YEAR": "2006",
                   "reasoning_required_pred": "no", "reasoning_free_pred": "maybe",
                   "final_decision": "maybe", "LONG_ANSWER": "It may be."},
  }
  write(folder / "test_set.json", json.dumps(items, indent=1))
  return release_rows("pubmedqa", [
      (PUBMEDQA.format(contexts="\n".join(i["CONTEXTS"]), question=i["QUESTION"]),
       i["final_decision"]) for i in items.values()])


def medqa_raw(folder: pathlib.Path) -> list[dict]:
  """MedQA's data_clean/questions/US/test.jsonl, put in the dataset's folder; a question ending in
  neither "?" nor "." gets a "?" in the release's query."""
  items = [
      {"question": "A 60-year-old man has sudden painless vision loss in one eye. Which is the "
                   "most likely diagnosis?", "answer": "Central retinal artery occlusion",
       "options": {"A": "Glaucoma", "B": "Central retinal artery occlusion", "C": "Cataract",
                   "D": "Uveitis", "E": "Migraine"},
       "meta_info": "step1", "answer_idx": "B"},
      {"question": "The drug of first choice for anaphylaxis is", "answer": "Epinephrine",
       "options": {"A": "Diphenhydramine", "B": "Prednisone", "C": "Salbutamol",
                   "D": "Ranitidine", "E": "Epinephrine"},
       "meta_info": "step2&3", "answer_idx": "E"},
  ]
  write(folder / "test.jsonl", jsonl(items))
  rows = []
  for item in items:
    question = item["question"] if item["question"].endswith(("?", ".")) else item["question"] + "?"
    options = "\n".join(f"{key}. {value}" for key, value in item["options"].items())
    rows.append((MEDQA.format(question=question, options=options), item["answer_idx"]))
  return release_rows("medqa", rows)


def mednli_raw(folder: pathlib.Path) -> list[dict]:
  """MedNLI's mli_test_v1.jsonl."""
  items = [
      {"sentence1": "Labs were notable for a creatinine of 2.1.", "pairID": "a1",
       "sentence1_parse": "(ROOT)", "sentence2": "The patient has renal impairment.",
       "sentence2_parse": "(ROOT)", "gold_label": "entailment"},
      {"sentence1": "No history of smoking.", "pairID": "a2", "sentence1_parse": "(ROOT)",
       "sentence2": "The patient smokes daily.", "sentence2_parse": "(ROOT)",
       "gold_label": "contradiction"},
      {"sentence1": "She was afebrile on arrival.", "pairID": "a3", "sentence1_parse": "(ROOT)",
       "sentence2": "She has a urinary tract infection.", "sentence2_parse": "(ROOT)",
       "gold_label": "neutral"},
  ]
  write(folder / "mli_test_v1.jsonl", jsonl(items))
  return release_rows("mednli", [(MEDNLI.format(**item), item["gold_label"]) for item in items])


def hoc_raw(folder: pathlib.Path) -> tuple[list[dict], pathlib.Path]:
  """The Hallmarks-of-Cancer corpus (text/<PMID>.txt, labels/<PMID>.txt), converted by
  prepare_mibe into the folder the tasks read; all of it the evaluation set here."""
  corpus = folder.parent / "Hallmarks-of-Cancer"
  abstracts = {
      "1001": (["Tumour cells evaded apoptosis .", "New vessels formed ."],
               "<Resisting cell death--Apoptosis<Inducing angiogenesis--"),
      "1002": (["The cohort was small ."], "< "),
  }
  for pmid, (sentences, labels) in abstracts.items():
    write(corpus / "text" / f"{pmid}.txt", "".join(s + "\n" for s in sentences))
    write(corpus / "labels" / f"{pmid}.txt", labels)
  pool = folder.parent / "hoc_pool"
  prepare("hoc", str(corpus), str(pool), test_fraction=0.5)
  records = [json.loads(line) for name in ("test.jsonl", "train.jsonl")
             for line in (pool / name).read_text().splitlines()]
  write(folder / "test.jsonl", jsonl(records))
  return release_rows("hoc", [(HOC.format(text=" ".join(abstracts[r["id"]][0])), r["labels"])
                              for r in records]), corpus


RAW = {"pubmedqa": pubmedqa_raw, "medqa": medqa_raw, "mednli": mednli_raw}


def raw_and_rows(dataset: str, tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[dict]]:
  folder = tmp_path / "raw" / dataset
  rows = hoc_raw(folder)[0] if dataset == "hoc" else RAW[dataset](folder)
  return folder, rows


# --------------------------------------------------------------------------------------------------
# (a) prompts rebuilt from raw data equal the stored queries; (b) the release's file prepared.


def cli():
  spec = importlib.util.spec_from_file_location("prepare_mibe",
                                                ROOT / "scripts" / "prepare_mibe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def gold_labels(row: dict) -> object:
  if isinstance(row["gold"], list):
    return [choice for choice, flag in zip(row["choices"], row["gold"]) if flag]
  return row["choices"][row["gold"]]


@pytest.mark.parametrize("dataset", ["pubmedqa", "medqa", "mednli", "hoc"])
def test_rebuilt_prompts_equal_the_stored_queries(tmp_path, dataset, capsys):
  folder, rows = raw_and_rows(dataset, tmp_path)
  parquet = write_parquet(tmp_path / "release" / f"{dataset}_test.parquet", rows)
  # (a) The release variant rebuilt from the raw data is the stored query, row for row.
  rebuilt = datasets.build_examples(dataset, str(folder), variant="release")
  assert [e["inputs"] for e in rebuilt] == [row["query"] for row in rows]
  assert [json.loads(e["gold"]) for e in rebuilt] == [gold_labels(row) for row in rows]
  # (b) The release's parquet file, prepared, is an evaluation set of those queries and golds.
  out = tmp_path / "mibe_release" / dataset
  assert cli().main([dataset, "--release_parquet", parquet, "--out", str(out)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["records"] == {"test": len(rows)} and summary["skipped"] == {}
  assert summary["files"] == {"test": datasets.RELEASE_QUERIES_FILE}
  assert json.loads((out / SUMMARY_FILE).read_text()) == summary
  examples = datasets.build_examples(dataset, str(out))
  assert [e["inputs"] for e in examples] == [row["query"] for row in rows]
  assert [json.loads(e["gold"]) for e in examples] == [gold_labels(row) for row in rows]
  assert [e["targets"] for e in examples] == [e["targets"] for e in rebuilt]
  if dataset != "hoc":
    assert all(e["options"] == CHOICES[dataset] for e in examples)


def test_generation_rows_and_a_raw_few_shot_pool(tmp_path, capsys):
  """emrQA's rows carry id, query and answer alone; HoC's corpus, given as --raw, is the pool."""
  rows = [{"id": f"EmrQA{i}", "query": EMRQA.format(context=f"Note {i}: aspirin 81 mg daily.",
                                                    question="What dose of aspirin?"),
           "answer": "aspirin 81 mg daily"} for i in range(2)]
  # Byte for byte: the release's line breaks around a template, CR LF, U+2028, trailing blanks.
  rows[1]["query"] = "\n" + rows[1]["query"].replace("Note 1:", "Note\r\n1:\u2028 ") + " \n"
  parquet = write_parquet(tmp_path / "emrqa_test.parquet", rows)
  out = tmp_path / "mibe_release" / "emrqa"
  assert cli().main(["emrqa", "--release_parquet", parquet, "--out", str(out)]) == 0
  capsys.readouterr()
  examples = datasets.build_examples("emrqa", str(out))
  assert [(e["inputs"], e["targets"], json.loads(e["gold"])) for e in examples] == [
      (row["query"], row["answer"], row["answer"]) for row in rows]

  hoc_rows, corpus = hoc_raw(tmp_path / "raw" / "hoc")
  parquet = write_parquet(tmp_path / "hoc_test.parquet", hoc_rows)
  out = tmp_path / "mibe_release" / "hoc"
  assert cli().main(["hoc", "--raw", str(corpus), "--release_parquet", parquet,
                     "--out", str(out)]) == 0
  assert json.loads(capsys.readouterr().out)["records"] == {"train": 2, "test": 2}
  [first, _] = datasets.build_examples("hoc", str(out), num_shots=1)
  assert first["inputs"].endswith("\n\n" + hoc_rows[0]["query"])
  assert first["inputs"].startswith(HOC.format(text="").split("INPUT:")[0])


def test_seqio_task_prompts_with_the_stored_queries(tmp_path, capsys):
  rows = pubmedqa_raw(tmp_path / "raw" / "pubmedqa")
  parquet = write_parquet(tmp_path / "pubmedqa_test.parquet", rows)
  data_dir = tmp_path / "mibe_release"
  assert cli().main(["pubmedqa", "--release_parquet", parquet,
                     "--out", str(data_dir / "pubmedqa")]) == 0
  capsys.readouterr()
  text = resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"
  model = train_sentencepiece(str(text), tmp_path / "tok", 512)
  shutil.copyfile(model, tmp_path / "tokenizer.model")
  [name] = register_mibe_tasks(str(data_dir), str(tmp_path / "tokenizer.model"),
                               datasets=["pubmedqa"])
  task = seqio.get_mixture_or_task(name)
  got = list(task.get_dataset(sequence_length=None, split="test", shuffle=False)
             .as_numpy_iterator())
  assert [e["inputs_pretokenized"].decode() for e in got] == [row["query"] for row in rows]
  assert [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True)
          for e in got] == ["yes", "maybe"]


# --------------------------------------------------------------------------------------------------
# Bad input: a bad row costs itself; a missing file or column stops with one line.


def test_unusable_rows_are_logged_counted_and_left_out(tmp_path, caplog, capsys):
  good = release_rows("pubmedqa", [("Q0", "yes"), ("Q1", "no")])
  bad = [
      {**good[0], "id": "p2", "gold": 3},  # out of range
      {**good[0], "id": "p3", "query": None},
      {**good[0], "id": "p4", "choices": ["no", "yes", "maybe"]},  # another order
      {**good[0], "id": None},
  ]
  parquet = write_parquet(tmp_path / "test.parquet", [good[0], *bad, good[1]])
  out = tmp_path / "out"
  assert cli().main(["pubmedqa", "--release_parquet", parquet, "--out", str(out)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["records"] == {"test": 2}
  assert summary["skipped"] == {"malformed_rows": 4}
  for line in (f"{parquet}: row 1 (id p2): field gold: 3 is not an index into the 3 choices",
               f"{parquet}: row 2 (id p3): field query: missing",
               f"{parquet}: row 3 (id p4): field choices:",
               f"{parquet}: row 4 (id None): field id: missing"):
    assert line in caplog.text
  assert [e["inputs"] for e in datasets.build_examples("pubmedqa", str(out))] == ["Q0", "Q1"]


def test_unusable_hoc_and_generation_rows(tmp_path, caplog):
  [row] = release_rows("hoc", [("Q", ["resisting cell death"])])
  rows = [row, {**row, "id": "h1", "gold": [1, 0]}, {**row, "id": "h2", "gold": [2] * 10},
          {**row, "id": "h3", "choices": ["tumour growth"] * 10}]
  summary = prepare("hoc", None, str(tmp_path / "hoc"),
                    release_parquet=write_parquet(tmp_path / "hoc.parquet", rows))
  assert summary["records"] == {"test": 1} and summary["skipped"] == {"malformed_rows": 3}
  assert "row 1 (id h1): field gold: not a 0/1 list over the 10 choices" in caplog.text
  assert "row 3 (id h3): field choices:" in caplog.text
  [record] = datasets.read_records("hoc", str(tmp_path / "hoc"))
  assert (record["answer"], record["gold"]) == ("resisting cell death", ["resisting cell death"])
  rows = [{"id": "e0", "query": "Q", "answer": "A"}, {"id": "e1", "query": "Q", "answer": " "}]
  summary = prepare("emrqa", None, str(tmp_path / "emrqa"),
                    release_parquet=write_parquet(tmp_path / "emrqa.parquet", rows))
  assert summary["skipped"] == {"malformed_rows": 1}
  assert "row 1 (id e1): field answer: empty" in caplog.text


def test_missing_file_and_column_are_one_line_naming_them(tmp_path, capsys):
  missing = str(tmp_path / "nowhere.parquet")
  assert cli().main(["medqa", "--release_parquet", missing, "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"prepare_mibe: error: {missing}: not found (expected the release's "
                        "parquet test file") and err.count("\n") == 1
  rows = release_rows("medqa", [("Q", "A")])
  parquet = write_parquet(tmp_path / "t.parquet", [{k: v for k, v in r.items() if k != "gold"}
                                                   for r in rows])
  assert cli().main(["medqa", "--release_parquet", parquet, "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"prepare_mibe: error: {parquet}: column gold: missing (the file has id, "
                        "query, answer, choices)") and err.count("\n") == 1
  not_parquet = write(tmp_path / "x.parquet", "id,query\n")
  assert cli().main(["medqa", "--release_parquet", str(not_parquet),
                     "--out", str(tmp_path / "o")]) == 1
  assert f"{not_parquet}: not a readable parquet file" in capsys.readouterr().err


def test_combinations_and_folders_that_would_hold_two_evaluation_sets(tmp_path):
  parquet = write_parquet(tmp_path / "t.parquet", release_rows("pubmedqa", [("Q", "yes")]))
  with pytest.raises(ValueError, match="no release parquet layout for 'i2b2'"):
    prepare("i2b2", None, str(tmp_path / "i2b2"), release_parquet=parquet)
  with pytest.raises(ValueError, match="give the raw release"):
    prepare("pubmedqa", None, str(tmp_path / "p"))
  with pytest.raises(ValueError, match="test_raw .* goes with raw"):
    prepare("hoc", "raw", str(tmp_path / "p"), test_raw="t", release_parquet=parquet)
  folder, _ = raw_and_rows("pubmedqa", tmp_path)
  with pytest.raises(FileExistsError, match="holds another evaluation set"):
    prepare("pubmedqa", None, str(folder), release_parquet=parquet)
  (folder / datasets.RELEASE_QUERIES_FILE).write_text("")
  with pytest.raises(ValueError, match=r"two evaluation sets, the release's queries "
                                       r"\(release_queries.jsonl\) and test_set.json"):
    datasets.build_examples("pubmedqa", str(folder))
  out = tmp_path / "release" / "pubmedqa"
  prepare("pubmedqa", None, str(out), release_parquet=parquet)
  with pytest.raises(ValueError, match="which are the release prompt variant"):
    datasets.build_examples("pubmedqa", str(out), variant="fixed")


def test_pyarrow_is_imported_only_to_read_a_file():
  code = ("import sys; import medllama_jax.eval.raw, medllama_jax.eval.datasets; "
          "assert 'pyarrow' not in sys.modules, 'pyarrow imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
