"""MIBE converters on small files in each release's format (written here, invented text): the
records that eval/datasets.py then reads, the errors malformed input gets, the seeded split, the
command line, and the release's prompt text to the character for the templates taken from it."""

from __future__ import annotations

import csv
import io
import importlib.util
import json
import pathlib
import re
import tarfile

import pytest

from medllama_jax.eval import datasets, scorers
from medllama_jax.eval.raw import RawFormatError, SUMMARY_FILE, prepare
from medllama_jax.eval.raw.common import split_units
from medllama_jax.eval.raw.mimic_cxr import report_sections

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mibe"

# The release's templates (src/preprocess_instruct.py of BIDS-Xu-Lab/Me-LLaMA), filled by hand.
DDI_RELEASE = (
    "TASK: The input is a sentence where the drug is labeled as @DRUG$. Extract the relationship "
    "between 2 @DRUG$ from the input sentence by selecting only one of the following options: "
    "'DDI-effect', 'DDI-mechanism', 'DDI-advise', 'DDI-false', and 'DDI-int'.\n"
    "DDI-effect, this type is used to annotate DDIs describing an effect or a pharmacodynamic "
    "mechanism\n"
    "DDI-mechanism, this type is used to annotate DDIs that are described by their pharmacokinetic "
    "mechanism\n"
    "DDI-advise, this type is used when a recommendation or advice regarding a drug interaction is "
    "given\n"
    "DDI-false, this type is used when no DDI relation appears\n"
    "DDI-int, this type is used when a DDI appears in the text without providing any additional "
    "information\n###\nINPUT: {}\nOUTPUT:")
HOC_RELEASE = (
    "The task is to decide the Hallmarks of Cancer (HOC) taxonomy of the article based on its "
    "abstract. The input is an abstract text. There are 10 topics you will need to decide whether "
    "the article is related to. Topics: sustaining proliferative signaling, evading growth "
    "suppressors, resisting cell death, enabling replicative immortality, inducing angiogenesis, "
    "activating invasion and metastasis, genomic instability and mutation, tumor promoting "
    "inflammation, cellular energetics, avoiding immune destruction. The output should be topics "
    "from the above 10 topics, that are related to the input article. Please note one article can "
    "be related to multiple topics. Output format: provide a semicolon-separated list of relevant "
    "topics.\n    ###\n    INPUT: {}\n    OUTPUT:")
MTSAMPLE_RELEASE = (
    "TASK: The task is to determine the medical specialty or domain that a medical transcription "
    "belongs to. The input is a medical transcription. There are 40 medical specialties or domains "
    "and you need to decide which one is the transcription related to. The medical specialties or "
    "domains are: 'Surgery', 'Allergy / Immunology', 'Sleep Medicine', 'Pediatrics - Neonatal', "
    "'SOAP / Chart / Progress Notes', 'Bariatrics', 'Pain Management', 'Lab Medicine - Pathology', "
    "'Dermatology', 'Orthopedic', 'Dentistry', 'Psychiatry / Psychology', 'General Medicine', "
    "'Office Notes', 'Letters', 'Neurosurgery', 'Radiology', 'Cosmetic / Plastic Surgery', "
    "'Nephrology', 'Diets and Nutritions', 'Chiropractic', 'Gastroenterology', 'Cardiovascular / "
    "Pulmonary', 'Speech - Language', 'Hospice - Palliative Care', 'Autopsy', 'Endocrinology', "
    "'Emergency Room Reports', 'Discharge Summary', 'ENT - Otolaryngology', 'Urology', 'Physical "
    "Medicine - Rehab', 'Neurology', 'Podiatry', 'Ophthalmology', 'Rheumatology', "
    "'IME-QME-Work Comp etc.', 'Hematology - Oncology', 'Consult - History and Phy.', "
    "'Obstetrics / Gynecology'. The output should be only one medical specialty or domain from the "
    "above 40 specialties or domains, that is most relevant to the medical transcription. Please "
    "note that each medical transcript can only be related to one medical specialty or domain. "
    "Output format: provide the name of the medical specialty or domain.\n###\nINPUT: {}\n"
    "OUTPUT:")
PUBMED_RELEASE = (
    "***TASK***\nthe task is to summarize an input biomedical literature in six sentences\n\n"
    "***INPUT***\nthe input is a biomedical literature\n\n***OUTPUT***\nthe output is the summary "
    "of an input biomedical literature in six sentences\n\n***DOCUMENTATION***\n\n***EXAMPLES***"
    "\n\nInput: {}\nOutput:")
MEDMCQA_RELEASE = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying "
    "health, disease, patient care, and modes of therapy, answer the following multiple-choice "
    "question. Select one correct answer from A to D. Base your answer on the current and standard "
    "practices referenced in medical guidelines.\nQuestion: {}\n\nOptions:\n{}\n\nThe answer is")


def write(path: pathlib.Path, text: str) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return str(path)


def convert(dataset: str, raw: str, tmp_path: pathlib.Path, **kwargs) -> tuple[str, dict]:
  out = str(tmp_path / "mibe" / dataset)
  return out, prepare(dataset, raw, out, **kwargs)


# --------------------------------------------------------------------------------------------------
# i2b2 2010 concepts.

NOTE = "The patient reports chest pain .\n\nAspirin was given for pain .\nNo labs today .\n"
CONCEPTS = ('c="chest pain" 1:3 1:4||t="problem"\nc="aspirin" 3:0 3:0||t="treatment"\n'
            'c="pain" 3:4 3:4||t="problem"\n')


def write_i2b2(folder: pathlib.Path, name: str, concepts: str = CONCEPTS) -> None:
  write(folder / "txt" / f"{name}.txt", NOTE)
  write(folder / "concept" / f"{name}.con", concepts)


def test_i2b2_notes_become_bio_sentences(tmp_path):
  write_i2b2(tmp_path / "train", "record-1")
  write(tmp_path / "train" / "txt" / "unannotated.txt", "A note without concepts .\n")
  write_i2b2(tmp_path / "test", "record-2")
  out, summary = convert("i2b2", str(tmp_path / "train"), tmp_path,
                         test_raw=str(tmp_path / "test"))
  assert summary["records"] == {"test": 3, "train": 3}
  assert summary["skipped"] == {"notes_without_concepts": 1} and summary["split"] == "release"
  records = datasets.read_records("i2b2", out)
  assert [r["gold"] for r in records] == [
      [["The", "patient", "reports", "chest", "pain", "."],
       ["O", "O", "O", "B-problem", "I-problem", "O"]],
      [["Aspirin", "was", "given", "for", "pain", "."],
       ["B-treatment", "O", "O", "O", "B-problem", "O"]],
      [["No", "labs", "today", "."], ["O", "O", "O", "O"]]]
  assert records[1]["answer"] == ('<span class="treatment">Aspirin</span> was given for '
                                  '<span class="problem">pain</span> .')
  assert json.loads((pathlib.Path(out) / SUMMARY_FILE).read_text()) == summary


@pytest.mark.parametrize("line,message", [
    ('c="chest pain" 1:3-1:4||t="problem"', r"record-1\.con: line 1: not a concept line"),
    ('c="chest pain" 1:3 1:9||t="problem"', r"line 1: tokens 3-9 outside line 1's 6 tokens"),
    ('c="chest pain" 9:3 9:4||t="problem"', r"line 1: line 9 outside the note's 5 lines"),
    ('c="chest pain" 1:3 1:4||t="disease"', r"line 1: field t: label 'disease' not in"),
    ('c="heart pain" 1:3 1:4||t="problem"', r"line 1: field c does not match tokens 3-4"),
    ('c="chest pain" 1:3 1:4||t="problem"\nc="pain" 1:4 1:4||t="problem"',
     r"line 2: concept overlaps another on line 1"),
])
def test_i2b2_malformed_concepts_are_named(tmp_path, caplog, line, message):
  write_i2b2(tmp_path / "raw", "record-1", line + "\n")
  write_i2b2(tmp_path / "raw", "record-2")
  write_i2b2(tmp_path / "raw", "record-3")
  convert("i2b2", str(tmp_path / "raw"), tmp_path)
  assert re.search(message, caplog.text)


# --------------------------------------------------------------------------------------------------
# DDI 2013.

DDI_DOCUMENT = """<?xml version="1.0" encoding="UTF-8"?>
<document id="DDI-DrugBank.d1" origId="Drug1">
  <sentence id="DDI-DrugBank.d1.s0" origId="s0" text="Ketoconazole raises plasma levels of \
midazolam and of oral triazolam.">
    <entity id="DDI-DrugBank.d1.s0.e0" origId="s0.p0"
        charOffset="0-11" type="drug" text="Ketoconazole"/>
    <entity id="DDI-DrugBank.d1.s0.e1" origId="s0.p1"
        charOffset="37-45" type="drug" text="midazolam"/>
    <entity id="DDI-DrugBank.d1.s0.e2" origId="s0.p2"
        charOffset="54-57;59-67" type="drug" text="oral triazolam"/>
    <pair id="DDI-DrugBank.d1.s0.p0" e1="DDI-DrugBank.d1.s0.e0"
        e2="DDI-DrugBank.d1.s0.e1" ddi="true" type="mechanism"/>
    <pair id="DDI-DrugBank.d1.s0.p1" e1="DDI-DrugBank.d1.s0.e0"
        e2="DDI-DrugBank.d1.s0.e2" ddi="true" type="mechanism"/>
    <pair id="DDI-DrugBank.d1.s0.p2" e1="DDI-DrugBank.d1.s0.e1"
        e2="DDI-DrugBank.d1.s0.e2" ddi="false"/>
  </sentence>
  <sentence id="DDI-DrugBank.d1.s1" origId="s1" text="No drugs here."/>
</document>
"""


def ddi_document(doc_id: str, **replace: str) -> str:
  text = DDI_DOCUMENT.replace("DDI-DrugBank.d1", doc_id)
  for old, new in replace.items():
    text = text.replace(old, new)
  return text


def test_ddi_pairs_become_marked_sentences_with_the_release_prompt(tmp_path):
  write(tmp_path / "Train" / "DrugBank" / "d1.xml", ddi_document("DDI-DrugBank.d1"))
  write(tmp_path / "Test" / "MedLine" / "d2.xml", ddi_document("DDI-MedLine.d2"))
  out, summary = convert("ddi", str(tmp_path / "Train"), tmp_path, test_raw=str(tmp_path / "Test"))
  assert summary["records"] == {"test": 1, "train": 1}
  assert summary["skipped"] == {"discontinuous_pairs": 4}
  records = datasets.read_records("ddi", out)
  assert [(r["sentence"], r["gold"]) for r in records] == [
      ("@DRUG$ raises plasma levels of @DRUG$ and of oral triazolam.", "DDI-mechanism")]
  [example] = datasets.build_examples("ddi", out)
  assert example["inputs"] == DDI_RELEASE.format(
      "@DRUG$ raises plasma levels of @DRUG$ and of oral triazolam.")
  assert example["options"] == list(scorers.DDI_LABELS)


def test_ddi_release_files_with_nested_discontinuous_and_damaged_mentions(tmp_path, caplog):
  corpus = FIXTURES / "DDICorpus"
  out, summary = convert("ddi", str(corpus / "Train"), tmp_path,
                         test_raw=str(corpus / "Test" / "Test for DDI Extraction task"))
  assert summary["records"] == {"test": 2, "train": 5}
  assert summary["skipped"] == {"discontinuous_pairs": 3, "malformed_pairs": 2}
  pairs = [json.loads(line) for line in (pathlib.Path(out) / "train.jsonl").open()]
  assert [(p["id"], p["sentence"], p["label"]) for p in pairs] == [
      ("DDI-DrugBank.d1.s0.p0", "@DRUG$ raises plasma levels of @DRUG$ and of oral or intravenous "
       "triazolam.", "DDI-mechanism"),
      ("DDI-DrugBank.d1.s0.p2", "@DRUG$ raises plasma levels of midazolam and of oral or @DRUG$.",
       "DDI-mechanism"),
      ("DDI-DrugBank.d1.s1.p0", "@DRUG-DRUG$ lowers serum levels of ciprofloxacin.", "DDI-false"),
      ("DDI-DrugBank.d1.s1.p1", "@DRUG$ gel lowers serum levels of @DRUG$.", "DDI-effect"),
      ("DDI-DrugBank.d1.s4.p1", "Warfarin with aspirin increases bleeding risk; @DRUG$ and @DRUG$ "
       "need monitoring.", "DDI-advise")]
  assert [(r["sentence"], r["gold"]) for r in datasets.read_records("ddi", out)] == [
      ("@DRUG$ may raise @DRUG$ levels.", "DDI-int"), ("@DRUG$ may raise @DRUG$.", "DDI-false")]
  assert ("Ketoconazole_ddi.xml: pair DDI-DrugBank.d1.s4.p0: field type: label 'synergy' not in"
          in caplog.text)
  assert ("Cimetidine.xml: pair DDI-MedLine.d2.s0.p2: field e2 'DDI-MedLine.d2.s0.e9' is no entity "
          "of sentence DDI-MedLine.d2.s0" in caplog.text)


@pytest.mark.parametrize("old,new,malformed,message", [
    ('charOffset="37-45"', 'charOffset="37-95"', 2, r"d1\.xml: pair DDI-DrugBank\.d1\.s0\.p0: "
     r"field e2 names a malformed entity DDI-DrugBank\.d1\.s0\.e1: field charOffset 37-95 "
     r"outside its sentence \(69 characters\)"),
    ('charOffset="37-45"', 'charOffset="36-44"', 2, r"pair DDI-DrugBank\.d1\.s0\.p2: field e1 "
     r"names a malformed entity DDI-DrugBank\.d1\.s0\.e1: field text differs"),
    ('ddi="true" type="mechanism"/>', 'ddi="true" type="synergy"/>', 2,
     r"pair DDI-DrugBank\.d1\.s0\.p0: field type: label 'synergy' not in"),
])
def test_ddi_malformed_pairs_are_reported_counted_and_left_out(tmp_path, caplog, old, new,
                                                               malformed, message):
  continuous = {'charOffset="54-57;59-67"': 'charOffset="54-67"'}
  write(tmp_path / "raw" / "d1.xml", ddi_document("DDI-DrugBank.d1", **continuous, **{old: new}))
  write(tmp_path / "raw" / "d2.xml", ddi_document("DDI-DrugBank.d2", **continuous))
  _, summary = convert("ddi", str(tmp_path / "raw"), tmp_path)
  assert sum(summary["records"].values()) == 6 - malformed
  assert summary["skipped"] == {"malformed_pairs": malformed}
  assert re.search(message, caplog.text)


def test_ddi_xml_that_is_not_well_formed_is_named(tmp_path):
  write(tmp_path / "raw" / "d1.xml", ddi_document(
      "DDI-DrugBank.d1", **{'<sentence id="DDI-DrugBank.d1.s1" origId="s1" text="No drugs here."/>':
                            "<sentence>"}))
  with pytest.raises(RawFormatError, match=r"d1\.xml: line \d+, column \d+: not well-formed XML"):
    convert("ddi", str(tmp_path / "raw"), tmp_path)


BLUE_DDI = FIXTURES / "blue" / "ddi2013-type"


def tsv_ids(path: pathlib.Path) -> list[str]:
  """The first column of a TSV file, header left out."""
  return [line.split("\t")[0] for line in path.read_text().splitlines()[1:]]


def test_ddi_blue_tsv_is_read_beside_the_xml_release(tmp_path):
  out, summary = convert("ddi", str(BLUE_DDI / "train.tsv"), tmp_path,
                         test_raw=str(BLUE_DDI / "test.tsv"))
  assert summary["records"] == {"test": 2, "train": 5} and summary["skipped"] == {}
  assert [(r["sentence"], r["gold"]) for r in datasets.read_records("ddi", out)] == [
      ("@DRUG$ may raise @DRUG$ levels.", "DDI-int"), ("@DRUG$ may raise @DRUG$.", "DDI-false")]
  shots = datasets.read_records("ddi", out, shots=True)
  assert [r["gold"] for r in shots] == ["DDI-mechanism", "DDI-mechanism", "DDI-false",
                                        "DDI-advise", "DDI-effect"]
  assert shots[3]["sentence"] == 'The label says "avoid @DRUG$ with @DRUG$".'


def test_ddi_blue_tsv_split_keeps_documents_whole(tmp_path):
  out, _ = convert("ddi", str(BLUE_DDI / "train.tsv"), tmp_path, seed=1, test_fraction=0.5)
  test = [json.loads(line)["id"] for line in (pathlib.Path(out) / "test.jsonl").open()]
  train = [json.loads(line)["id"] for line in (pathlib.Path(out) / "train.jsonl").open()]
  documents = {pair_id.rsplit(".", 2)[0] for pair_id in test}
  assert len(documents) == 1 and not any(i.rsplit(".", 2)[0] in documents for i in train)
  assert sorted(test + train) == sorted(tsv_ids(BLUE_DDI / "train.tsv"))


def test_ddi_blue_tsv_malformed_rows_are_reported_counted_and_left_out(tmp_path, caplog):
  rows = BLUE_DDI.joinpath("train.tsv").read_text() + (
      "DDI-MedLine.d4.s0.p0\t@DRUG$ and @DRUG$ combined.\tDDI-synergy\n"
      "DDI-MedLine.d4.s0.p1\tNo marker here.\tDDI-false\n"
      "DDI-MedLine.d4.s0.p2\t@DRUG$ alone.\n")
  raw = write(tmp_path / "train.tsv", rows)
  _, summary = convert("ddi", raw, tmp_path)
  assert summary["skipped"] == {"malformed_rows": 3}
  assert sum(summary["records"].values()) == 5
  assert "train.tsv: line 7, pair DDI-MedLine.d4.s0.p0: field label: 'DDI-synergy' not in" in (
      caplog.text)
  assert "line 8, pair DDI-MedLine.d4.s0.p1: field sentence holds neither two @DRUG$" in caplog.text
  assert "line 9: 2 fields, expected 3 (index, sentence, label)" in caplog.text


def test_ddi_blue_tsv_with_another_header_is_refused(tmp_path):
  raw = write(tmp_path / "train.tsv", "id\tsentence\tlabel\nx\t@DRUG$ @DRUG$\tDDI-false\n")
  with pytest.raises(RawFormatError, match=r"train\.tsv: line 1: header .* is not BLUE's"):
    convert("ddi", raw, tmp_path)


# --------------------------------------------------------------------------------------------------
# Hallmarks of Cancer.

def write_hoc(folder: pathlib.Path, pmid: str, sentences: list[str], labels: str) -> None:
  write(folder / "text" / f"{pmid}.txt", "".join(s + "\n" for s in sentences))
  write(folder / "labels" / f"{pmid}.txt", labels)


def test_hoc_abstracts_get_their_sentences_hallmarks_and_the_release_prompt(tmp_path):
  raw = tmp_path / "Hallmarks-of-Cancer"
  write_hoc(raw, "100", ["Cells escaped apoptosis .", "Nothing here .", "Vessels grew ."],
            "< Resisting cell death--Apoptosis< <  Inducing angiogenesis--Vessels ANDResisting "
            "cell death--Apoptosis")
  write_hoc(raw, "200", ["A plain sentence ."], "< ")
  write_hoc(raw, "300", ["Mutations piled up ."], "<Genomic instability and mutation--")
  out, summary = convert("hoc", str(raw), tmp_path, seed=3, test_fraction=0.3)
  assert summary["records"] == {"test": 1, "train": 2}
  records = {r["text"]: r for r in datasets.read_records("hoc", out)
             + datasets.read_records("hoc", out, shots=True)}
  assert records["Cells escaped apoptosis . Nothing here . Vessels grew ."]["gold"] == [
      "resisting cell death", "inducing angiogenesis"]
  assert records["Cells escaped apoptosis . Nothing here . Vessels grew ."]["answer"] == (
      "resisting cell death;inducing angiogenesis")
  assert records["A plain sentence ."]["gold"] == []
  example = datasets.build_examples("hoc", out)[0]
  text = next(r["text"] for r in datasets.read_records("hoc", out))
  assert example["inputs"] == HOC_RELEASE.format(text)
  fixed = datasets.build_examples("hoc", out, variant="fixed")[0]["inputs"]
  assert fixed.endswith(f"topics.\n###\nINPUT: {text}\nOUTPUT:")


@pytest.mark.parametrize("labels,message", [
    ("< <Resisting cell death--Apoptosis", r"100\.txt: 2 label fields for the 1 sentences"),
    ("<Escaping gravity--Flight", r"100\.txt: sentence 1: label 'Escaping gravity' not among"),
])
def test_hoc_malformed_labels_are_named(tmp_path, labels, message):
  write_hoc(tmp_path / "raw", "100", ["One sentence ."], labels)
  with pytest.raises(RawFormatError, match=message):
    convert("hoc", str(tmp_path / "raw"), tmp_path)


BLUE_HOC = FIXTURES / "blue" / "hoc"


def test_hoc_blue_tsv_sentences_become_abstracts_with_their_labels_union(tmp_path):
  out, summary = convert("hoc", str(BLUE_HOC / "train.tsv"), tmp_path,
                         test_raw=str(BLUE_HOC / "test.tsv"))
  assert summary["records"] == {"test": 2, "train": 3} and summary["skipped"] == {}
  assert [(r["text"], r["gold"]) for r in datasets.read_records("hoc", out)] == [
      ("Immune cells failed to clear the tumour . Inflammation fed proliferative signals .",
       ["sustaining proliferative signaling", "tumor promoting inflammation",
        "avoiding immune destruction"]),
      ("A plain sentence .", [])]
  pool = [json.loads(line) for line in (pathlib.Path(out) / "train.jsonl").open()]
  assert pool == [
      {"id": "1001", "text": "Tumour cells escaped apoptosis . Nothing else was seen . New vessels "
       "grew around the tumour .", "labels": ["resisting cell death", "inducing angiogenesis"]},
      {"id": "1002", "text": "Mutations accumulated in the genome .",
       "labels": ["genomic instability and mutation"]},
      {"id": "1003", "text": "The cells were starved . Glycolysis rose sharply .",
       "labels": ["cellular energetics"]}]


def test_hoc_blue_tsv_orders_sentences_and_reports_malformed_rows(tmp_path, caplog):
  rows = [line for line in BLUE_HOC.joinpath("train.tsv").read_text().splitlines(keepends=True)]
  rows[1:4] = [rows[3], rows[1], rows[2]]
  rows += ["0_1,1_0\tOdd labels .\t1004_s0\n", "0_0,1_1\tAnd fine .\t1004_s1\n",
           "0_1,12_1\tBad label .\t1005_s0\n", "0_0\tNo index .\n"]
  raw = write(tmp_path / "train.tsv", "".join(rows))
  out, summary = convert("hoc", raw, tmp_path, test_fraction=0.5)
  assert summary["skipped"] == {"malformed_abstracts": 1, "malformed_rows": 1}
  records = datasets.read_records("hoc", out) + datasets.read_records("hoc", out, shots=True)
  assert {r["text"] for r in records} == {
      "Tumour cells escaped apoptosis . Nothing else was seen . New vessels grew around the "
      "tumour .", "Mutations accumulated in the genome .",
      "The cells were starved . Glycolysis rose sharply .", "Odd labels . And fine ."}
  assert ("train.tsv: line 10, sentence 1005_s0: field labels: '12_1' is not i_0 or i_1 with i "
          "below 10" in caplog.text)
  assert "train.tsv: line 11: not 3 fields, or field index not PMID_sN" in caplog.text


def test_hoc_blue_tsv_with_another_header_is_refused(tmp_path):
  raw = write(tmp_path / "test.tsv", "index\tsentence1\tsentence2\tlabel\n")
  with pytest.raises(RawFormatError, match=r"test\.tsv: line 1: header .* does not name BLUE's"):
    convert("hoc", raw, tmp_path)


# --------------------------------------------------------------------------------------------------
# emrQA.

def emrqa_json(evidence_line: int = 2,
               evidence: str = "Lisinopril 10 mg daily for hypertension .") -> dict:
  def note(note_id: str) -> dict:
    return {"note_id": note_id,
            "context": ["Admitted with headache .\n", "Lisinopril 10 mg daily for hypertension .\n",
                        "Follow up in two weeks .\n"],
            "qas": [{"id": ["q1"], "question": ["Why is the patient on lisinopril?",
                                                 "What is lisinopril for?"],
                     "answers": [{"text": "hypertension", "answer_start": [evidence_line, 5],
                                  "evidence": evidence, "evidence_start": [evidence_line]}]},
                    {"id": ["q2"], "question": ["Has the patient smoked?"],
                     "answers": [{"text": "no", "answer_start": [0, 0], "evidence": "",
                                  "evidence_start": []}]}]}
  return {"data": [{"title": "medication", "paragraphs": [note("101"), note("102")]}]}


def test_emrqa_evidence_lines_become_squad_answers(tmp_path):
  raw = write(tmp_path / "data.json", json.dumps(emrqa_json()))
  out, summary = convert("emrqa", raw, tmp_path)
  assert summary["records"] == {"test": 1, "train": 1}
  assert summary["skipped"] == {"questions_without_evidence": 2}
  [record] = datasets.read_records("emrqa", out)
  assert record["context"] == ("Admitted with headache .\nLisinopril 10 mg daily for "
                               "hypertension .\nFollow up in two weeks .")
  assert record["question"] == "Why is the patient on lisinopril?"
  assert record["gold"] == "Lisinopril 10 mg daily for hypertension ."
  squad = json.loads((pathlib.Path(out) / "test.json").read_text())
  [answer] = squad["data"][0]["paragraphs"][0]["qas"][0]["answers"]
  assert record["context"][answer["answer_start"]:].startswith(answer["text"])


def test_emrqa_complex_answers_give_each_evidence_line(tmp_path):
  out, summary = convert("emrqa", str(AS_RELEASED / "emrqa" / "data.json"), tmp_path)
  assert summary["records"] == {"test": 1, "train": 2} and summary["skipped"] == {}
  squad = json.loads((pathlib.Path(out) / "test.json").read_text())
  [paragraph] = squad["data"][0]["paragraphs"]
  context = paragraph["context"]
  answers = {qa["question"]: qa["answers"] for qa in paragraph["qas"]}
  assert [a["text"] for a in answers["What is the dosage of metoprolol?"]] == [
      "Metoprolol was started for rate control .", "Dose 25 mg twice daily by mouth ."]
  assert [a["text"] for a in answers["What is the dosage of aspirin?"]] == ["Aspirin 81 mg daily ."]
  assert all(context[a["answer_start"]:].startswith(a["text"])
             for found in answers.values() for a in found)
  record = datasets.read_records("emrqa", out)[0]
  assert record["gold"] == "Metoprolol was started for rate control ."


@pytest.mark.parametrize("kwargs,message", [
    ({"evidence_line": 7}, r"data\.json: 'medication' note 101, question 0: answer_start line 7 "
     "outside the note's 3 lines"),
    ({"evidence": "Metformin 500 mg ."}, r"note 101, question 0: field evidence does not occur"),
    ({"evidence": ["Lisinopril 10 mg daily for hypertension ."] * 2},
     r"note 101, question 0: a complex answer's evidence_start \(or answer_start lines\) does "
     "not give a line for each of its 2 evidence parts"),
])
def test_emrqa_malformed_pieces_are_reported_counted_and_left_out(tmp_path, caplog, kwargs,
                                                                  message):
  data = emrqa_json(**kwargs)
  good = emrqa_json()["data"][0]["paragraphs"]
  for note_id, paragraph in zip(("103", "104"), good):
    data["data"][0]["paragraphs"].append({**paragraph, "note_id": note_id})
  data["data"].append({"title": "relations"})
  raw = write(tmp_path / "data.json", json.dumps(data))
  _, summary = convert("emrqa", raw, tmp_path)
  assert summary["records"] == {"test": 1, "train": 1}
  assert summary["skipped"] == {"malformed_articles": 1, "malformed_questions": 2,
                                "notes_without_questions": 2, "questions_without_evidence": 4}
  assert re.search(message, caplog.text)
  assert "article 'relations': no list field paragraphs" in caplog.text


# --------------------------------------------------------------------------------------------------
# MTSamples.

MTSAMPLES_HEADER = ["", "description", "medical_specialty", "sample_name", "transcription",
                    "keywords"]


def write_mtsamples(path: pathlib.Path, rows: list[tuple[str, str]]) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(MTSAMPLES_HEADER)
    for index, (specialty, transcription) in enumerate(rows):
      writer.writerow([index, "Invented.", f" {specialty}", f" Sample {index} ", transcription, ""])
  return str(path)


def test_mtsamples_split_keeps_copies_together_and_the_release_prompt(tmp_path):
  rows = [("Surgery", f"PROCEDURE: Invented operation {k}.") for k in range(8)]
  rows += [("Orthopedic", "PROCEDURE: Invented operation 3."), ("Neurology", ""),
           ("Neurology", "HISTORY: Invented numbness,\nleft hand.")]
  raw = write_mtsamples(tmp_path / "mtsamples.csv", rows)
  out, summary = convert("mtsample", raw, tmp_path, seed=1, test_fraction=0.25)
  assert summary["skipped"] == {"rows_without_transcription": 1}
  test, pool = datasets.read_records("mtsample", out), datasets.read_records("mtsample", out, True)
  assert (len(test), len(pool)) == (2, 8)
  assert sorted(r["transcription"] for r in test + pool) == sorted(t for _, t in rows if t)
  copies = [r for r in test + pool if r["transcription"] == "PROCEDURE: Invented operation 3."]
  assert len(copies) == 2 and (copies[0] in test) == (copies[1] in test)
  _, again = convert("mtsample", raw, tmp_path, seed=1, test_fraction=0.25, overwrite=True)
  assert datasets.read_records("mtsample", out) == test
  [example, *_] = datasets.build_examples("mtsample", out)
  assert example["inputs"] == MTSAMPLE_RELEASE.format(test[0]["transcription"])
  with open(pathlib.Path(out) / "test.csv", encoding="utf-8", newline="") as f:
    assert next(csv.reader(f)) == MTSAMPLES_HEADER


def test_mtsamples_unknown_specialty_is_named(tmp_path):
  raw = write_mtsamples(tmp_path / "mtsamples.csv", [("Surgery", "A."), ("Astrology", "B.")])
  with pytest.raises(RawFormatError, match=r"mtsamples\.csv: row 2 \(line 3\): field "
                     r"medical_specialty: 'Astrology' is not one of the 40"):
    convert("mtsample", raw, tmp_path)


# --------------------------------------------------------------------------------------------------
# MIMIC-CXR, BioNLI.

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old with cough.

 FINDINGS:

 The lungs are clear.  Heart size is
 normal.

 IMPRESSION:

 No acute process.
"""


def test_mimic_cxr_reports_become_findings_and_impression(tmp_path):
  files = tmp_path / "files"
  for k in range(4):
    write(files / "p10" / f"p1000000{k}" / f"s5000000{k}.txt",
          REPORT.replace("cough", f"cough {k}"))
  write(files / "p11" / "p11000000" / "s51000000.txt", REPORT.split(" IMPRESSION")[0])
  write(files / "p11" / "p11000000" / "notes.txt", "not a report")
  out, summary = convert("mimic_cxr", str(files), tmp_path, test_fraction=0.5)
  assert summary["records"] == {"test": 2, "train": 2}
  assert summary["skipped"] == {"no_impression": 1, "not_a_report": 1}
  record = datasets.read_records("mimic_cxr", out)[0]
  assert (record["findings"], record["gold"]) == ("The lungs are clear. Heart size is normal.",
                                                  "No acute process.")
  assert report_sections(REPORT)["examination"] == "CHEST (PA AND LAT)"


def test_bionli_rows_become_two_way_nli(tmp_path, caplog):
  header = "pmid,supp_set,conclusion,label_cat\n"
  train = write(tmp_path / "train.csv", header + '1,"Gene X rose, then fell.",X rose.,pos\n'
                "1,Gene X rose.,X fell.,SRE\n")
  test = write(tmp_path / "test.csv",
               header + "2,Drug Y lowered pressure.,Y lowers pressure.,pos\n")
  out, summary = convert("bionli", train, tmp_path, test_raw=test)
  assert summary["records"] == {"test": 1, "train": 2}
  pool = datasets.read_records("bionli", out, shots=True)
  assert [(r["premise"], r["hypothesis"], r["gold"]) for r in pool] == [
      ("Gene X rose, then fell.", "X rose.", "entailment"),
      ("Gene X rose.", "X fell.", "contradiction")]
  bad = write(tmp_path / "bad.csv", "supp_set,conclusion,label\nA.,B.,maybe\n")
  with pytest.raises(ValueError, match=r"bionli: no train records from .*bad\.csv"):
    convert("bionli", bad, tmp_path, test_raw=test, overwrite=True)
  assert "bad.csv: row 1 (line 2): field label: 'maybe'" in caplog.text


# --------------------------------------------------------------------------------------------------
# Split, command line, and the release's prompts of the datasets read as released.


def test_split_is_seeded_by_unit():
  units = [(f"note{k % 5}", {"k": k}) for k in range(20)]
  test, train = split_units(units, seed=0, test_fraction=0.4, source="x")
  assert len(test) == 8 and len(train) == 12
  assert {r["k"] % 5 for r in test}.isdisjoint({r["k"] % 5 for r in train})
  assert split_units(list(reversed(units)), 0, 0.4, "x")[0] == list(reversed(test))
  assert any(split_units(units, seed, 0.4, "x")[0] != test for seed in range(1, 5))
  with pytest.raises(ValueError, match="x: 1 split unit"):
    split_units(units[:1], 0, 0.4, "x")


def prepare_mibe():
  """scripts/prepare_mibe.py as a module, for its entry point ``main``."""
  spec = importlib.util.spec_from_file_location("prepare_mibe",
                                                ROOT / "scripts" / "prepare_mibe.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  return cli


def test_command_line(tmp_path, capsys):
  cli = prepare_mibe()
  raw = write_mtsamples(tmp_path / "mtsamples.csv", [("Surgery", "A."), ("Urology", "B.")])
  out = str(tmp_path / "mibe" / "mtsample")
  assert cli.main(["mtsample", "--raw", raw, "--out", out, "--seed", "2"]) == 0
  assert json.loads(capsys.readouterr().out)["records"] == {"test": 1, "train": 1}
  assert cli.main(["mtsample", "--raw", raw, "--out", out]) == 1
  assert "test.csv, train.csv, prepare_summary.json already there" in capsys.readouterr().err
  bad = write_mtsamples(tmp_path / "bad.csv", [("Surgery", "A."), ("Astrology", "B.")])
  assert cli.main(["mtsample", "--raw", bad, "--out", out, "--overwrite"]) == 1
  assert capsys.readouterr().err.startswith(f"prepare_mibe: error: {bad}: row 2 (line 3): field")


def write_damaged_mtsamples(path: pathlib.Path) -> str:
  """7 items: 4 usable rows, 1 without transcription (left out by design), 2 malformed rows."""
  raw = write_mtsamples(path, [("Surgery", "A."), ("Urology", "B."), ("Surgery", "C."),
                               ("Urology", "D."), ("Neurology", " ")])
  with open(raw, "a", encoding="utf-8", newline="") as f:
    f.write('5,Invented., Surgery,Sample 5,"E "quoted".",\n6,Invented., Surgery,Sample 6\n')
  return raw


@pytest.mark.parametrize("over,under", [("1", "2"), ("0.25", "0.3")])
def test_max_errors_fails_the_run_writing_nothing(tmp_path, capsys, over, under):
  """A count or a fraction of the 7 items read; the row left out by design does not count."""
  cli = prepare_mibe()
  raw = write_damaged_mtsamples(tmp_path / "mtsamples.csv")
  out = tmp_path / "mibe" / "mtsample"
  assert cli.main(["mtsample", "--raw", raw, "--out", str(out), "--max_errors", over]) == 1
  last = capsys.readouterr().err.splitlines()[-1]
  assert last.startswith(f"prepare_mibe: error: mtsample: too many malformed items, nothing "
                         f"written: 2 of 7 items (28.57%) > max_errors {over} (malformed_rows 2); "
                         "each is logged with its file and place (traceback: ")
  assert list(out.iterdir()) == []
  assert cli.main(["mtsample", "--raw", raw, "--out", str(out), "--max_errors", under]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["skipped"] == {"malformed_rows": 2, "rows_without_transcription": 1}
  assert (summary["items_read"], summary["max_errors"]) == (7, float(under))
  assert sorted(path.name for path in out.iterdir()) == [SUMMARY_FILE, "test.csv", "train.csv"]


def test_max_errors_over_the_threshold_keeps_an_earlier_run_whole(tmp_path, capsys):
  """--overwrite with too many malformed items leaves the earlier run's files as they were."""
  cli = prepare_mibe()
  out = tmp_path / "mibe" / "mtsample"
  good = write_mtsamples(tmp_path / "good.csv", [("Surgery", "A."), ("Urology", "B.")])
  assert cli.main(["mtsample", "--raw", good, "--out", str(out)]) == 0
  before = {path.name: path.read_bytes() for path in out.iterdir()}
  damaged = write_damaged_mtsamples(tmp_path / "damaged.csv")
  assert cli.main(["mtsample", "--raw", damaged, "--out", str(out), "--overwrite",
                   "--max_errors", "0"]) == 1
  assert "2 of 7 items (28.57%) > max_errors 0" in capsys.readouterr().err
  assert {path.name: path.read_bytes() for path in out.iterdir()} == before
  assert cli.main(["mtsample", "--raw", good, "--out", str(out), "--overwrite",
                   "--max_errors", "1.5"]) == 1
  assert "max_errors must be a whole count (0, 1, 2...) or a fraction" in capsys.readouterr().err


def test_medmcqa_and_pubmed_prompts_are_the_release_text():
  medmcqa = datasets.build_examples("medmcqa", str(FIXTURES / "medmcqa"))[0]
  assert medmcqa["inputs"] == MEDMCQA_RELEASE.format(
      "Drug of choice for absence seizures is?",
      "A. Phenytoin\nB. Ethosuximide\nC. Carbamazepine\nD. Phenobarbital")
  assert medmcqa["targets"] == "B"
  pubmed = datasets.build_examples("pubmed_summarization", str(FIXTURES / "pubmed_summarization"))
  assert pubmed[0]["inputs"] == PUBMED_RELEASE.format(
      "we studied sleep duration in 300 nurses working night shifts . short sleep was linked to "
      "more medication errors .")


# --------------------------------------------------------------------------------------------------
# Files as their releases ship them (tests/fixtures/mibe/as_released): MedQA's 4-option files,
# MedMCQA's unlabelled test.json, Cohan et al.'s records with an empty article.

AS_RELEASED = FIXTURES / "as_released"


def test_medqa_4_option_files_list_and_score_their_own_options():
  folder = str(AS_RELEASED / "medqa" / "4_options")
  [first, second] = datasets.build_examples("medqa", folder, num_shots=1)
  assert first["inputs"].endswith(
      "select one correct answer from A to D. Base your answer on the current and standard "
      "practices referenced in medical guidelines.\nQuestion: A 23-year-old woman has dysuria and "
      "urinary frequency without fever. Which drug is the best first choice?\n\nOptions:\n"
      "A. Ampicillin\nB. Ceftriaxone\nC. Doxycycline\nD. Nitrofurantoin\n\nThe answer is")
  assert "D. Hypernatremia\n\nThe answer is B\n\n" in first["inputs"]
  assert (first["targets"], second["targets"]) == ("D", "B")
  assert first["options"] == second["options"] == ["A", "B", "C", "D"]
  assert json.loads(first["gold"]) == "D"
  five = datasets.build_examples("medqa", str(FIXTURES / "medqa"))[0]
  assert "from A to E." in five["inputs"] and five["options"] == list(scorers.MEDQA_OPTIONS)


def test_medqa_folder_mixing_both_releases_is_refused(tmp_path):
  folder = tmp_path / "medqa"
  folder.mkdir()
  (folder / "test.jsonl").write_text((FIXTURES / "medqa" / "test.jsonl").read_text())
  (folder / "phrases_no_exclude_test.jsonl").write_text(
      (AS_RELEASED / "medqa" / "4_options" / "phrases_no_exclude_test.jsonl").read_text())
  with pytest.raises(ValueError, match=r"'medqa': the evaluation set mixes records with \[4, 5\]"):
    datasets.build_examples("medqa", str(folder))


def test_medmcqa_unlabelled_test_split_is_refused_by_name():
  path = str(AS_RELEASED / "medmcqa" / "test.json")
  with pytest.raises(ValueError) as error:
    datasets.SPECS["medmcqa"].read(path)
  message = str(error.value)
  assert message.startswith(f"{path}: no field cop (id 0a1b2c3d-0000-4000-8000-000000000001)")
  assert "unlabelled" in message and "cannot be scored" in message and "\n" not in message


def test_pubmed_articles_without_text_are_skipped_and_logged(caplog):
  path = str(AS_RELEASED / "pubmed_summarization" / "test.txt")
  [record] = datasets.read_records("pubmed_summarization", str(AS_RELEASED / "pubmed_summarization"))
  assert record["gold"] == "short sleep in night - shift nurses was linked to medication errors ."
  assert f"{path}: skipped 1 article(s) with an empty article_text: article_id PMC1000002" in (
      caplog.text)


# --------------------------------------------------------------------------------------------------
# Damaged items left out, logged and counted: MTSamples, BioNLI.

def test_mtsamples_malformed_rows_are_reported_counted_and_left_out(tmp_path, caplog):
  raw = write_mtsamples(tmp_path / "mtsamples.csv", [
      ("Surgery", "PROCEDURE: Invented operation 1."), ("Urology", "HISTORY: Invented,\nstones."),
      ("Neurology", "  "), ("Surgery", "PROCEDURE: Invented operation 2.")])
  with open(raw, "a", encoding="utf-8", newline="") as f:
    f.write('4,Invented., Surgery,Sample 4,"PROCEDURE: Invented "quoted" operation.",\n'
            "5,Invented., Surgery,Sample 5\n"
            '6,Invented., Urology,Sample 6,"PROCEDURE: Invented operation 6.",\n')
  out, summary = convert("mtsample", raw, tmp_path)
  assert summary["skipped"] == {"malformed_rows": 2, "rows_without_transcription": 1}
  records = datasets.read_records("mtsample", out) + datasets.read_records("mtsample", out, True)
  assert sorted(r["transcription"] for r in records) == [
      "HISTORY: Invented,\nstones.", "PROCEDURE: Invented operation 1.",
      "PROCEDURE: Invented operation 2.", "PROCEDURE: Invented operation 6."]
  assert "mtsamples.csv: row 5 (line 7): CSV: ',' expected after '\"'" in caplog.text
  assert "mtsamples.csv: row 6 (line 8): 4 fields, the header has 6" in caplog.text


def test_bionli_malformed_rows_are_reported_counted_and_left_out(tmp_path, caplog):
  raw = write(tmp_path / "train.csv", "pmid,supp_set,conclusion,label\n"
              '1,"Gene X rose, then fell.",X rose.,pos\n'
              "1,Gene X rose.,X fell.,neg\n"
              "2,Drug Y lowered pressure.,Y lowers pressure.,maybe\n"
              "3,,Z helps.,pos\n"
              "4,Drug W calmed the cough.\n"
              "5,Drug V cleared the rash.,V clears rashes.,entailment\n")
  out, summary = convert("bionli", raw, tmp_path)
  assert summary["skipped"] == {"malformed_rows": 3}
  records = datasets.read_records("bionli", out) + datasets.read_records("bionli", out, True)
  assert sorted(r["hypothesis"] for r in records) == ["V clears rashes.", "X fell.", "X rose."]
  assert "train.csv: row 3 (line 4): field label: 'maybe' not in" in caplog.text
  assert "train.csv: row 4 (line 5): field supp_set or conclusion is empty" in caplog.text
  assert "train.csv: row 5 (line 6): 2 fields, the header has 4" in caplog.text
  no_premise = write(tmp_path / "other.csv", "pmid,premise,conclusion,label\n1,A.,B.,pos\n")
  with pytest.raises(RawFormatError, match=r"other\.csv: header: need columns supp_set"):
    convert("bionli", no_premise, tmp_path, overwrite=True)


def test_i2b2_malformed_concepts_and_notes_are_reported_counted_and_left_out(tmp_path, caplog):
  release = tmp_path / "concept_assertion_relation_training_data"
  write_i2b2(release / "beth", "record-1")
  write_i2b2(release / "beth", "record-2", CONCEPTS.replace('3:0 3:0||t="treatment"',
                                                           '3:0 3:0||t="drug"'))
  write_i2b2(release / "beth", "record-3", 'c="chest pain" 9:3 9:4||t="problem"\n' + CONCEPTS)
  write(release / "beth" / "concept" / "record-4.con", CONCEPTS)
  write_i2b2(release / "partners", "record-5")
  write(release / "partners" / "txt" / "record-6.txt", NOTE)
  out, summary = convert("i2b2", str(release), tmp_path)
  assert summary["skipped"] == {"malformed_concepts": 1, "malformed_notes": 2,
                                "notes_without_concepts": 1}
  ids = [json.loads(line)["id"] for name in summary["files"].values()
         for line in (pathlib.Path(out) / name).open()]
  assert sorted(ids) == ["record-1:1", "record-1:3", "record-1:4",
                                              "record-2:1", "record-2:4",
                                              "record-5:1", "record-5:3", "record-5:4"]
  assert "record-2.con: line 2: field t: label 'drug' not in" in caplog.text
  assert "record-3.con: line 1: line 9 outside the note's 5 lines" in caplog.text
  assert re.search(r"record-4\.con: no note record-4\.txt under", caplog.text)


def test_mimic_cxr_damaged_reports_are_reported_counted_and_left_out(tmp_path, caplog):
  files = tmp_path / "files"
  for k in range(3):
    write(files / "p10" / f"p1000000{k}" / f"s5000000{k}.txt",
          REPORT.replace("cough", f"cough {k}"))
  without_findings = REPORT.split(" FINDINGS")[0] + REPORT.split("normal.\n")[1]
  write(files / "p11" / "p11000000" / "s51000000.txt", without_findings)
  (files / "p11" / "p11000001").mkdir(parents=True)
  (files / "p11" / "p11000001" / "s51000001.txt").write_bytes(b" FINDINGS: Clear \xff.\n")
  write(files / "p12" / "p12000000" / "s52000000.txt", "\n  \n")
  out, summary = convert("mimic_cxr", str(files), tmp_path)
  assert summary["records"] == {"test": 1, "train": 2}
  assert summary["skipped"] == {"malformed_reports": 2, "no_findings": 1}
  assert re.search(r"p11000001/s51000001\.txt: not UTF-8", caplog.text)
  assert re.search(r"p12000000/s52000000\.txt: cxr:52000000: empty report", caplog.text)
  assert "s51000000" not in {json.loads(line)["id"] for name in summary["files"].values()
                             for line in (pathlib.Path(out) / name).open()}


def test_mimic_cxr_package_that_ends_early_is_refused(tmp_path):
  whole = io.BytesIO()
  with tarfile.open(fileobj=whole, mode="w") as package:
    for k in range(4):
      data = REPORT.replace("cough", f"cough {k}").encode()
      member = tarfile.TarInfo(f"files/p10/p1000000{k}/s5000000{k}.txt")
      member.size = len(data)
      package.addfile(member, io.BytesIO(data))
  raw = tmp_path / "mimic-cxr-reports.tar"
  raw.write_bytes(whole.getvalue()[:1024 + 512 + 10])  # Into the second report.
  with pytest.raises(RawFormatError, match=r"mimic-cxr-reports\.tar: after 1 records: "
                     r"(truncated|corrupt)_file: the input cannot be read past this point"):
    convert("mimic_cxr", str(raw), tmp_path)
