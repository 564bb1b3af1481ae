"""The MIBE datasets (and MMLU): readers, the release's prompts, gold answers for the scorers.

Every dataset is read from a local folder ``{data_dir}/{dataset}/`` that the user fills (nothing is
downloaded; most sets are credentialed). :data:`SPECS` says which files each folder holds; a reader
turns one file into records (dicts) of canonical fields plus ``answer`` (the text the model should
write, which is also what a few-shot demonstration shows) and ``gold`` (the reference in the format
``scorers.SCORERS[dataset]`` takes, JSON-serialisable). Files (evaluation set / few-shot pool)
and formats. Seven sets are read in a layout ``scripts/prepare_mibe.py`` writes from the raw
release (``medllama_jax/eval/raw/``, one converter per release format); the release's own
preprocessed files are not public, so their record unit and preprocessing are our choices, marked
"ours" and stated here:

* ``pubmedqa``: ``test_set.json`` / ``train_set.json``, the output of PubMedQA's
  ``preprocess/split_dataset.py`` (PQA-L, 500 test questions): ``{pmid: {QUESTION, CONTEXTS,
  final_decision}}``.
* ``medqa``: ``*test.jsonl`` / ``*train.jsonl``, MedQA-USMLE: ``{question, options: {A..E},
  answer_idx}`` (``US/*.jsonl``) or, from the same release, ``{question, options: {A..D},
  answer_idx}`` (``US/4_options/phrases_no_exclude_*.jsonl``); each record lists and is scored on
  the options it has. A folder holds one of the two.
* ``medmcqa``: ``dev.json`` / ``train.json``, the official jsonl files ``{question, opa..opd,
  cop}`` with ``cop`` 1-4. The test set has no public answers (no ``cop``), so dev is the
  evaluation set; a file without ``cop`` is refused as unlabelled, never scored.
* ``emrqa``: ``test.json`` / ``train.json``, SQuAD json (``data/paragraphs/qas``); the first answer
  is the gold. From emrQA's generated ``data.json`` (ours): a paragraph per note, a question's
  first paraphrase, its answers the note lines holding the answer (emrQA's ``evidence``: the
  paper's SQuAD version).
* ``i2b2``: ``test.jsonl`` / ``train.jsonl``, ``{tokens, tags}`` with BIO tags over
  problem/treatment/test. From the n2c2 2010 ``.txt``/``.con`` files (ours): one record per
  non-empty note line (the notes are one sentence a line), tokens split on whitespace as the
  ``.con`` offsets count them.
* ``ddi``: ``test.jsonl`` / ``train.jsonl``, ``{sentence, label}`` with a label of
  ``scorers.DDI_LABELS``. From the DDI 2013 XML (ours): one record per candidate pair, the pair's
  two mentions replaced by ``@DRUG$`` as the release's prompt describes its input.
* ``hoc``: ``test.jsonl`` / ``train.jsonl``, ``{text, labels: [...]}`` with labels of
  ``scorers.HOC_LABELS``; the answer joins them with ";" as the release's does. From the corpus'
  per-sentence labels (ours): one record per abstract (the release's prompt asks about an
  abstract), labelled with the top-level hallmarks of any of its sentences.
* ``mtsample``: ``test.csv`` / ``train.csv``, a split of Kaggle's mtsamples.csv (its columns);
  rows without a transcription are skipped. The split (ours) is a seeded draw that keeps copies of
  a transcription (MTSamples lists many under several specialties) on one side.
* ``pubmed_summarization``: ``test.txt`` / ``train.txt``, Cohan et al. 2018's jsonl:
  ``{article_id, article_text: [sentences], abstract_text: ["<S> ... </S>", ...]}``; the article
  is its sentences joined by spaces (ours); articles with an empty ``article_text`` are skipped and
  logged with their ids.
* ``mimic_cxr``: ``test.jsonl`` / ``train.jsonl``, ``{findings, impression}``. From the report
  tree (ours): the FINDINGS and IMPRESSION sections, whitespace collapsed; reports lacking either
  are skipped.
* ``bionli``: ``test.jsonl`` / ``train.jsonl``, ``{premise, hypothesis, label}``. From BioNLI's
  CSV files (ours): ``supp_set`` / ``conclusion``, labels ``entailment`` or ``contradiction``
  (BioNLI is two-way).
* ``mednli``: ``mli_test_v1.jsonl`` / ``mli_train_v1.jsonl``, ``{sentence1, sentence2,
  gold_label}``.
* ``mmlu``: ``test/*_test.csv`` / ``dev/*_dev.csv``, Hendrycks et al.'s CSVs without a header
  (question, A, B, C, D, answer).

The evaluation set may instead be the release's own test set: ``release_queries.jsonl``
(:data:`RELEASE_QUERIES_FILE`), written by ``scripts/prepare_mibe.py DATASET --release_parquet``
from the release's parquet file (``medllama_jax/eval/raw/release.py``), records ``{id, query,
answer, gold}`` (and ``choices`` for multiple choice) whose ``query`` is the prompt, byte for byte.
A folder holds one evaluation set: that file or the dataset's own test files, never both.

Prompts: the ``release`` variant is the release's text. Its evaluation harness (an
lm-evaluation-harness 0.3.0 fork) reads each example's ``query``, which the release's
``src/preprocess_instruct.py`` (BIDS-Xu-Lab/Me-LLaMA) builds from one template per dataset; the
PubMedQA, MedQA, MedMCQA (Meditron's instruction), emrQA, DDI, HoC, MTSample, PubMed
summarization, MedNLI and MIMIC-CXR templates here are those, character for character, less the
line break at the very start of a template string (MedNLI, emrQA, MTSample) and the one at its very
end (all but MIMIC-CXR's, which ends in indentation, kept). The i2b2 and BioNLI templates are
not in the release and are ours, in the same style (BioNLI's is MedNLI's). ``fixed`` is the same
text with three flaws of the release mended (emrQA's "Question" without a colon; the indented
"###/INPUT/OUTPUT" lines of MIMIC-CXR and HoC). k-shot prompts put k demonstrations (prompt and
answer) from the few-shot pool before the prompt, separated by a blank line; each test example
draws its own k with a seed of (``seed``, its index), so a prompt does not depend on which other
examples are evaluated. MMLU is the general-domain task of the forgetting study; it is scored as
MedMCQA (four option letters), its shots come from the dev CSVs of all subjects; its prompt is
Hendrycks et al.'s zero-shot format, not the release's own MMLU template (which asks for an
option index 0-3).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import os
import random
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath

from medllama_jax.eval import metrics, scorers

Record = dict[str, Any]
PROMPT_VARIANTS = ("release", "fixed")
# The evaluation set taken from the release's own test file (module docstring).
RELEASE_QUERIES_FILE = "release_queries.jsonl"
# The seed the release draws few-shot examples with.
DEFAULT_FEWSHOT_SEED = 1234


# --------------------------------------------------------------------------------------------------
# Readers: one file → records with the dataset's canonical fields, ``answer`` and ``gold``.


def _read_text(path: str) -> str:
  """The file's text exactly as stored (line ends untouched, as csv needs), local or in a bucket."""
  return epath.Path(path).read_bytes().decode("utf-8")


def _read_json(path: str) -> Any:
  return json.loads(_read_text(path))


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  return [json.loads(line) for line in _read_text(path).split("\n") if line.strip()]


def _read_csv_rows(path: str) -> io.StringIO:
  return io.StringIO(_read_text(path), newline="")


def _labelled(answer: str, **fields: Any) -> Record:
  """A single-label record: the label is both what the model should write and the gold."""
  return {**fields, "answer": answer, "gold": answer}


def _read_pubmedqa(path: str) -> list[Record]:
  return [_labelled(item["final_decision"], question=item["QUESTION"],
                    contexts=list(item["CONTEXTS"])) for item in _read_json(path).values()]


def _medqa_letters(path: str, row: Mapping[str, Any]) -> tuple[str, ...]:
  """The record's option letters: MedQA's ``US/*.jsonl`` records have A-E, its
  ``4_options/phrases_no_exclude_*.jsonl`` records A-D; the answer must be one of them."""
  letters = scorers.MEDQA_OPTIONS[:len(row["options"])]
  if sorted(row["options"]) != list(letters) or row["answer_idx"] not in letters:
    raise ValueError(f"{path}: options {sorted(row['options'])} with answer_idx "
                     f"{row['answer_idx']!r}; MedQA letters its 4 or 5 options from A and answers "
                     "with one of those letters")
  return letters


def _read_medqa(path: str) -> list[Record]:
  records = []
  for row in _read_jsonl(path):
    letters = _medqa_letters(path, row)
    records.append(_labelled(row["answer_idx"], question=row["question"],
                             options=[row["options"][letter] for letter in letters],
                             choices=list(letters)))
  return records


def _read_medmcqa(path: str) -> list[Record]:
  records = []
  for row in _read_jsonl(path):
    if "cop" not in row:
      raise ValueError(f"{path}: no field cop (id {row.get('id')}): an unlabelled MedMCQA split "
                       "(the public test.json has no answers) cannot be scored; evaluate on "
                       "dev.json")
    if row["cop"] not in (1, 2, 3, 4):
      raise ValueError(f"{path}: cop={row['cop']!r} (id {row.get('id')}); the official MedMCQA "
                       "files number the correct option 1-4 (a 0-3 export needs converting)")
    records.append(_labelled(scorers.MEDMCQA_OPTIONS[row["cop"] - 1], question=row["question"],
                             options=[row[key] for key in ("opa", "opb", "opc", "opd")]))
  return records


def _read_emrqa(path: str) -> list[Record]:
  return [{"context": paragraph["context"], "question": qa["question"],
           "answer": qa["answers"][0]["text"], "gold": qa["answers"][0]["text"]}
          for article in _read_json(path)["data"] for paragraph in article["paragraphs"]
          for qa in paragraph["qas"]]


def _read_i2b2(path: str) -> list[Record]:
  return [{"tokens": row["tokens"], "answer": scorers.render_ner_html(row["tokens"], row["tags"]),
           "gold": [row["tokens"], row["tags"]]} for row in _read_jsonl(path)]


def _read_ddi(path: str) -> list[Record]:
  return [_labelled(row["label"], sentence=row["sentence"]) for row in _read_jsonl(path)]


def _read_hoc(path: str) -> list[Record]:
  """The answer is the release's: the hallmarks joined by ";" (no spaces)."""
  return [{"text": row["text"], "answer": ";".join(row["labels"]), "gold": list(row["labels"])}
          for row in _read_jsonl(path)]


def _read_mtsample(path: str) -> list[Record]:
  return [_labelled(row["medical_specialty"].strip(), transcription=row["transcription"].strip())
          for row in csv.DictReader(_read_csv_rows(path)) if row["transcription"].strip()]


def _cohan_sentences(sentences: Sequence[str]) -> str:
  """Cohan et al. wrap abstract sentences in ``<S>``/``</S>``; the text is the sentences joined."""
  return " ".join(" ".join(s.replace("<S>", " ").replace("</S>", " ").split()) for s in sentences)


def _read_pubmed_summarization(path: str) -> list[Record]:
  """Articles whose ``article_text`` is empty (the release has some) leave nothing to summarise:
  they are skipped, and their ids logged with the file, rather than scored against an abstract."""
  records, empty = [], []
  for row in _read_jsonl(path):
    article = " ".join(row["article_text"])
    if not article.strip():
      empty.append(str(row.get("article_id")))
      continue
    abstract = _cohan_sentences(row["abstract_text"])
    records.append({"article": article, "answer": abstract, "gold": abstract})
  if empty:
    logging.warning("%s: skipped %d article(s) with an empty article_text: article_id %s", path,
                    len(empty), ", ".join(empty))
  return records


def _read_mimic_cxr(path: str) -> list[Record]:
  return [{"findings": row["findings"], "answer": row["impression"], "gold": row["impression"]}
          for row in _read_jsonl(path)]


def _read_bionli(path: str) -> list[Record]:
  return [_labelled(row["label"], premise=row["premise"], hypothesis=row["hypothesis"])
          for row in _read_jsonl(path)]


def _read_mednli(path: str) -> list[Record]:
  return [_labelled(row["gold_label"], premise=row["sentence1"], hypothesis=row["sentence2"])
          for row in _read_jsonl(path)]


def _read_mmlu(path: str) -> list[Record]:
  subject = os.path.basename(path).rsplit("_", 1)[0].replace("_", " ")
  return [_labelled(answer.strip(), subject=subject, question=question, options=options)
          for question, *options, answer in csv.reader(_read_csv_rows(path))]


# --------------------------------------------------------------------------------------------------
# Prompts: (record, variant) → the text the model continues.

_MEDQA_INSTRUCTION = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to "
    "demonstrate your understanding of basic and clinical science, medical knowledge, and "
    "mechanisms underlying health, disease, patient care, and modes of therapy. Show your ability "
    "to apply the knowledge essential for medical practice. For the following multiple-choice "
    "question, select one correct answer from A to {last}. Base your answer on the current and "
    "standard practices referenced in medical guidelines.")
# Meditron's MedMCQA instruction, which the release's MedMCQA template uses verbatim.
_MEDMCQA_INSTRUCTION = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying "
    "health, disease, patient care, and modes of therapy, answer the following multiple-choice "
    "question. Select one correct answer from A to {last}. Base your answer on the current and "
    "standard practices referenced in medical guidelines.")
_NLI_TASK = ("TASK: Please classify the relationship between the given premise and hypothesis into "
             "one of the following labels: entailment, contradiction, or neutral. Return only the "
             "label.")


def _lettered(options: Sequence[str]) -> str:
  return "\n".join(f"{letter}. {option}" for letter, option in zip(scorers.MEDQA_OPTIONS, options))


def _exam_prompt(instruction: str) -> Callable[[Record, str], str]:
  """MedQA/MedMCQA: a question that ends in neither "?" nor "." gets a "?" (as in the release). The
  instruction names the record's last option letter ("A to E" for MedQA's 5 options, "A to D" for
  its 4-option files and MedMCQA), as the options listed are the record's."""

  def prompt(r: Record, variant: str) -> str:
    question = r["question"] if r["question"].endswith(("?", ".")) else r["question"] + "?"
    text = instruction.format(last=scorers.MEDQA_OPTIONS[len(r["options"]) - 1])
    return (f"{text}\nQuestion: {question}\n\nOptions:\n{_lettered(r['options'])}\n\n"
            "The answer is")

  return prompt


def _task_prompt(task: str, input_field: str) -> Callable[[Record, str], str]:
  """The release's "TASK: ... ### INPUT: ... OUTPUT:" layout."""
  return lambda r, variant: f"TASK: {task}\n###\nINPUT: {r[input_field]}\nOUTPUT:"


def _pubmedqa_prompt(r: Record, variant: str) -> str:
  contexts = "\n".join(r["contexts"])
  return ("As an expert doctor in clinical science and medical knowledge, can you tell me if the "
          "following statement is correct? Answer yes, no, or maybe.\n"
          f"{contexts}\n{r['question']}\nThe answer is:")


def _nli_prompt(r: Record, variant: str) -> str:
  return f"{_NLI_TASK}\n###\nINPUT: [PRE] {r['premise']} [HYP] {r['hypothesis']}\nOUTPUT:"


def _emrqa_prompt(r: Record, variant: str) -> str:
  question_cue = "Question" if variant == "release" else "Question:"
  return ("TASK: Given a medical context and an open-ended question related to it, extract the "
          "relevant text segment from the context as an answer. Expected output: Only extract and "
          "return the text segment from the provided context that directly answers the question. "
          f"Do not add any new words.\n###\nContext: {r['context']}\n{question_cue} "
          f"{r['question']}\nAnswer:")


def _mimic_cxr_prompt(r: Record, variant: str) -> str:
  indent = "    " if variant == "release" else ""
  return (f"Derive the impression from findings in the radiology report.\n{indent}INPUT: "
          f"{r['findings']}\n{indent}OUTPUT:\n{indent}")


def _i2b2_prompt(r: Record, variant: str) -> str:
  # Ours (the release published no i2b2 template), in its TASK/INPUT/OUTPUT style.
  return ("TASK: Mark every medical problem, treatment and test mentioned in the input. Return the "
          'input text unchanged, each mention wrapped in <span class="problem">, '
          '<span class="treatment"> or <span class="test"> and </span>.\n###\n'
          f"INPUT: {' '.join(r['tokens'])}\nOUTPUT:")


def _mmlu_prompt(r: Record, variant: str) -> str:
  """Hendrycks et al.'s zero-shot format."""
  return (f"The following are multiple choice questions (with answers) about {r['subject']}.\n\n"
          f"{r['question']}\n{_lettered(r['options'])}\nAnswer:")


_DDI_TASK = (
    "The input is a sentence where the drug is labeled as @DRUG$. Extract the relationship "
    "between 2 @DRUG$ from the input sentence by selecting only one of the following options: "
    "'DDI-effect', 'DDI-mechanism', 'DDI-advise', 'DDI-false', and 'DDI-int'.\n"
    "DDI-effect, this type is used to annotate DDIs describing an effect or a pharmacodynamic "
    "mechanism\n"
    "DDI-mechanism, this type is used to annotate DDIs that are described by their "
    "pharmacokinetic mechanism\n"
    "DDI-advise, this type is used when a recommendation or advice regarding a drug interaction "
    "is given\n"
    "DDI-false, this type is used when no DDI relation appears\n"
    "DDI-int, this type is used when a DDI appears in the text without providing any additional "
    "information")
_HOC_TASK = (
    "The task is to decide the Hallmarks of Cancer (HOC) taxonomy of the article based on its "
    "abstract. The input is an abstract text. There are 10 topics you will need to decide whether "
    f"the article is related to. Topics: {', '.join(scorers.HOC_LABELS)}. The output should be "
    "topics from the above 10 topics, that are related to the input article. Please note one "
    "article can be related to multiple topics. Output format: provide a semicolon-separated list "
    "of relevant topics.")
_QUOTED_SPECIALTIES = ", ".join(f"'{name}'" for name in scorers.MTSAMPLE_SPECIALTIES)
_MTSAMPLE_TASK = (
    "The task is to determine the medical specialty or domain that a medical transcription "
    "belongs to. The input is a medical transcription. There are 40 medical specialties or domains "
    "and you need to decide which one is the transcription related to. The medical specialties or "
    f"domains are: {_QUOTED_SPECIALTIES}. The output should "
    "be only one medical specialty or domain from the above 40 specialties or domains, that is "
    "most relevant to the medical transcription. Please note that each medical transcript can only "
    "be related to one medical specialty or domain. Output format: provide the name of the medical "
    "specialty or domain.")
_PUBMED_TASK = (
    "***TASK***\nthe task is to summarize an input biomedical literature in six sentences\n\n"
    "***INPUT***\nthe input is a biomedical literature\n\n"
    "***OUTPUT***\nthe output is the summary of an input biomedical literature in six sentences"
    "\n\n***DOCUMENTATION***\n\n***EXAMPLES***\n\n")
_DDI_PROMPT = _task_prompt(_DDI_TASK, "sentence")
_MTSAMPLE_PROMPT = _task_prompt(_MTSAMPLE_TASK, "transcription")


def _hoc_prompt(r: Record, variant: str) -> str:
  """The release indents the "###/INPUT/OUTPUT" lines of this one template; ``fixed`` does not."""
  indent = "    " if variant == "release" else ""
  return f"{_HOC_TASK}\n{indent}###\n{indent}INPUT: {r['text']}\n{indent}OUTPUT:"


def _pubmed_prompt(r: Record, variant: str) -> str:
  return f"{_PUBMED_TASK}Input: {r['article']}\nOutput:"


_BIONLI_PROMPT = _nli_prompt  # Ours: MedNLI's template (the release published none for BioNLI).


# --------------------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read, prompt and score one dataset.

  ``test_files``/``shot_files``: globs inside the dataset's folder (evaluation set, few-shot pool);
  ``options``: the answers of a multiple-choice dataset, ranked by log-likelihood in addition to
  being scored from generated text; ``scorer``: the key of ``scorers.SCORERS``; ``source``: where to
  get the data, for the error raised when the folder is missing.
  """
  test_files: str
  shot_files: str
  read: Callable[[str], list[Record]]
  prompt: Callable[[Record, str], str]
  scorer: str
  source: str
  options: tuple[str, ...] = ()


_CREDENTIALED = ("credentialed: PhysioNet / n2c2 (DBMI Data Portal) after signing the data use "
                 "agreement")

SPECS: Mapping[str, DatasetSpec] = types.MappingProxyType({
    "pubmedqa": DatasetSpec(
        "test_set.json", "train_set.json", _read_pubmedqa, _pubmedqa_prompt, "pubmedqa",
        "https://github.com/pubmedqa/pubmedqa (PQA-L; run preprocess/split_dataset.py)",
        scorers.PUBMEDQA_LABELS),
    "medqa": DatasetSpec(
        "*test.jsonl", "*train.jsonl", _read_medqa, _exam_prompt(_MEDQA_INSTRUCTION), "medqa",
        "the MedQA release, https://github.com/jind11/MedQA (data_clean/questions/US/*.jsonl or "
        "US/4_options/phrases_no_exclude_*.jsonl)",
        scorers.MEDQA_OPTIONS),
    "medmcqa": DatasetSpec(
        "dev.json", "train.json", _read_medmcqa, _exam_prompt(_MEDMCQA_INSTRUCTION), "medmcqa",
        "https://medmcqa.github.io", scorers.MEDMCQA_OPTIONS),
    "emrqa": DatasetSpec("test.json", "train.json", _read_emrqa, _emrqa_prompt, "emrqa",
                         f"emrQA ({_CREDENTIALED}; generate data.json with emrQA's scripts), "
                         "then scripts/prepare_mibe.py emrqa"),
    "i2b2": DatasetSpec("test.jsonl", "train.jsonl", _read_i2b2, _i2b2_prompt, "i2b2",
                        f"the i2b2 2010 concept data ({_CREDENTIALED}), then "
                        "scripts/prepare_mibe.py i2b2"),
    "ddi": DatasetSpec("test.jsonl", "train.jsonl", _read_ddi, _DDI_PROMPT, "ddi",
                       "the DDI 2013 corpus (DDI Extraction 2013, https://github.com/isegura/"
                       "DDICorpus), then scripts/prepare_mibe.py ddi", scorers.DDI_LABELS),
    "hoc": DatasetSpec("test.jsonl", "train.jsonl", _read_hoc, _hoc_prompt, "hoc",
                       "the Hallmarks of Cancer corpus (Baker et al. 2016, "
                       "https://github.com/sb895/Hallmarks-of-Cancer), then "
                       "scripts/prepare_mibe.py hoc"),
    "mtsample": DatasetSpec("test.csv", "train.csv", _read_mtsample, _MTSAMPLE_PROMPT, "mtsample",
                            "MTSamples, Kaggle's mtsamples.csv, then scripts/prepare_mibe.py "
                            "mtsample",
                            scorers.MTSAMPLE_SPECIALTIES),
    "pubmed_summarization": DatasetSpec(
        "test.txt", "train.txt", _read_pubmed_summarization, _pubmed_prompt,
        "pubmed_summarization",
        "the PubMed summarization set of Cohan et al. 2018, https://github.com/armancohan/"
        "long-summarization"),
    "mimic_cxr": DatasetSpec("test.jsonl", "train.jsonl", _read_mimic_cxr, _mimic_cxr_prompt,
                             "mimic_cxr", f"MIMIC-CXR reports ({_CREDENTIALED}), then "
                             "scripts/prepare_mibe.py mimic_cxr"),
    "bionli": DatasetSpec("test.jsonl", "train.jsonl", _read_bionli, _BIONLI_PROMPT, "bionli",
                          "BioNLI (Bastan et al. 2022, https://github.com/StonyBrookNLP/BioNLI), "
                          "then scripts/prepare_mibe.py bionli",
                          scorers.NLI_LABELS),
    "mednli": DatasetSpec("mli_test_v1.jsonl", "mli_train_v1.jsonl", _read_mednli, _nli_prompt,
                          "mednli", f"MedNLI ({_CREDENTIALED})", scorers.NLI_LABELS),
    "mmlu": DatasetSpec("test/*_test.csv", "dev/*_dev.csv", _read_mmlu, _mmlu_prompt, "medmcqa",
                        "MMLU, https://github.com/hendrycks/test (data.tar: test/ and dev/)",
                        scorers.MEDMCQA_OPTIONS),
})
MIBE_DATASETS: tuple[str, ...] = tuple(scorers.SCORERS)


def get_spec(dataset: str) -> DatasetSpec:
  if dataset not in SPECS:
    raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(SPECS)}")
  return SPECS[dataset]


def dataset_files(dataset: str, dataset_dir: str, shots: bool = False) -> list[str]:
  """The files of the evaluation set (or the few-shot pool) in ``dataset_dir``; a clear error, with
  where to get the data and where to put it, when there are none.

  The evaluation set is ``RELEASE_QUERIES_FILE`` where the folder has it; beside the dataset's own
  test files it is refused, since either could be the one meant.
  """
  spec = get_spec(dataset)
  pattern = spec.shot_files if shots else spec.test_files
  files = sorted(os.fspath(p) for p in epath.Path(dataset_dir).glob(pattern))
  release_queries = epath.Path(dataset_dir) / RELEASE_QUERIES_FILE
  if not shots and release_queries.exists():
    if files:
      raise ValueError(
          f"MIBE dataset {dataset!r}: {dataset_dir} holds two evaluation sets, the release's "
          f"queries ({RELEASE_QUERIES_FILE}) and {', '.join(map(os.path.basename, files))}; keep "
          "one (prepare the release's queries into a folder of their own)")
    return [os.fspath(release_queries)]
  if not files:
    role = "few-shot pool (needed for k > 0 shots)" if shots else "evaluation set"
    raise FileNotFoundError(
        f"MIBE dataset {dataset!r}: no {role} {os.path.join(dataset_dir, pattern)}. Get it from "
        f"{spec.source} and put it there (see medllama_jax/eval/datasets.py for the format); it "
        "is never downloaded.")
  return files


def read_records(dataset: str, dataset_dir: str, shots: bool = False) -> list[Record]:
  spec = get_spec(dataset)
  files = dataset_files(dataset, dataset_dir, shots)
  records = [r for path in files
             for r in (_read_jsonl(path) if os.path.basename(path) == RELEASE_QUERIES_FILE
                       else spec.read(path))]
  if not records:
    raise ValueError(f"MIBE dataset {dataset!r}: no examples in {files}")
  return records


def _check_one_option_count(dataset: str, records: Sequence[Record]) -> None:
  """Records that carry their own ``choices`` (MedQA: 4 or 5) must agree within an evaluation set:
  the examples' ``options`` form one rectangular feature, and a folder holding both MedQA
  releases would count each question twice."""
  counts = sorted({len(r["choices"]) for r in records if "choices" in r})
  if len(counts) > 1:
    raise ValueError(f"MIBE dataset {dataset!r}: the evaluation set mixes records with {counts} "
                     "options; keep the files of one release (5 or 4 options) in the folder")


def _check_release_queries_variant(dataset: str, records: Sequence[Record], variant: str) -> None:
  """The release's queries are its prompt text: evaluating them as another variant would report
  release prompts under that variant's name."""
  if variant != "release" and any("query" in r for r in records):
    raise ValueError(f"MIBE dataset {dataset!r}: the evaluation set is the release's queries "
                     f"({RELEASE_QUERIES_FILE}), which are the release prompt variant; the "
                     f"{variant!r} variant needs the dataset's own test files")


def with_answer(prompt: str, answer: str) -> str:
  """A demonstration: the prompt, a space unless the prompt ends in whitespace, the answer."""
  return f"{prompt}{'' if prompt[-1:].isspace() else ' '}{answer}"


def build_examples(dataset: str, dataset_dir: str, num_shots: int = 0, variant: str = "release",
                   seed: int = 0) -> list[dict[str, Any]]:
  """Evaluation examples: ``index``, ``inputs`` (the prompt text), ``targets`` (the answer text),
  ``gold`` (JSON of the scorer's reference) and, for multiple choice, ``options``."""
  if variant not in PROMPT_VARIANTS:
    raise ValueError(f"prompt variant must be one of {PROMPT_VARIANTS}, not {variant!r}")
  if num_shots < 0:
    raise ValueError(f"num_shots={num_shots} must be >= 0")
  spec = get_spec(dataset)
  pool = read_records(dataset, dataset_dir, shots=True) if num_shots else []
  if len(pool) < num_shots:
    raise ValueError(f"MIBE dataset {dataset!r}: {num_shots} shots asked, the pool has {len(pool)}")
  records = read_records(dataset, dataset_dir)
  _check_one_option_count(dataset, records)
  _check_release_queries_variant(dataset, records, variant)
  examples = []
  for index, record in enumerate(records):
    shots = random.Random(f"{seed}:{index}").sample(pool, num_shots)
    demonstrations = [with_answer(spec.prompt(s, variant), s["answer"]) for s in shots]
    prompt = "\n\n".join([*demonstrations, record["query"] if "query" in record
                           else spec.prompt(record, variant)])
    example = {"index": index, "inputs": prompt, "targets": record["answer"],
               "gold": json.dumps(record["gold"])}
    if spec.options:
      example["options"] = list(record.get("choices", spec.options))
    examples.append(example)
  return examples


# --------------------------------------------------------------------------------------------------
# seqio hooks: postprocessing and metric functions.


def _text(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def postprocess(output: str | bytes, example: Mapping[str, Any] | None = None,
                is_target: bool = False) -> Any:
  """seqio's ``postprocess_fn``: a prediction stays text (the scorers parse it); a target becomes
  the scorer's reference, read from the example's ``gold`` feature."""
  if is_target:
    return json.loads(_text(example["gold"]))
  return _text(output)


@dataclasses.dataclass(frozen=True)
class GeneratedTextMetric:
  """A scorer over generated text, its keys prefixed ``{variant}/`` so variants do not collide.
  ``bertscore_model_dir``: the local encoder folder of a scorer that computes BERTScore."""
  scorer: str
  variant: str
  bertscore_model_dir: str | None = None

  def __call__(self, targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, Any]:
    encoder = ({} if self.bertscore_model_dir is None
               else {"bertscore_model_dir": self.bertscore_model_dir})
    scores = scorers.SCORERS[self.scorer](targets, predictions, self.variant, **encoder)
    return {f"{self.variant}/{key}": value for key, value in scores.items()}


@dataclasses.dataclass(frozen=True)
class OptionRankingMetric:
  """Log-likelihood multiple choice: ``scores`` holds, per example, the log-likelihood of each of
  ``options`` as the continuation of the prompt; keys are prefixed ``loglikelihood/``."""
  options: tuple[str, ...]

  def __call__(self, targets: Sequence[str], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    gold = [self.options.index(target) for target in targets]
    return {f"loglikelihood/{k}": v for k, v in metrics.loglikelihood_choice(scores, gold).items()}


def computes_bertscore(dataset: str) -> bool:
  """Whether the dataset's scorer reports BERTScore (it then takes ``bertscore_model_dir``)."""
  scorer = scorers.SCORERS[get_spec(dataset).scorer]
  return "bertscore_model_dir" in inspect.signature(scorer).parameters


def metric_fns(dataset: str,
               bertscore_model_dir: str | None = None) -> list[Callable[..., dict[str, Any]]]:
  """The release and fixed scorers, and option ranking for a multiple-choice dataset.

  ``bertscore_model_dir`` (a local encoder folder) reaches the scorers that compute BERTScore (the
  summarisation datasets; the others have none); without it BERTScore is reported as ``None``.
  """
  spec = get_spec(dataset)
  encoder = bertscore_model_dir if computes_bertscore(dataset) else None
  fns: list[Callable[..., dict[str, Any]]] = [GeneratedTextMetric(spec.scorer, variant, encoder)
                                              for variant in scorers.VARIANTS]
  if spec.options:
    fns.append(OptionRankingMetric(spec.options))
  return fns
