"""MIBE Tasks on invented fixtures (tests/fixtures/mibe): the release's prompt text to the
character, deterministic k-shot prompts, gold answers the scorers accept (an oracle scores 1
through each Task's own metric functions), and the error for a dataset folder that is not there."""

from __future__ import annotations

import functools
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import seqio

from medllama_jax.eval import datasets
from medllama_jax.tokenizer import train_sentencepiece
from seqio_tasks.mibe import TASKS, register_mibe_tasks, task_name

FIXTURES = Path(__file__).parent / "fixtures" / "mibe"
# Headline metrics of each scorer's fixed variant; an oracle scores 1 on all that a task reports.
ORACLE_KEYS = ("acc", "f1", "macro_f1", "exact_match", "precision", "recall", "rouge1", "rouge2",
               "rougeL")

MEDQA_INSTRUCTION = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to "
    "demonstrate your understanding of basic and clinical science, medical knowledge, and "
    "mechanisms underlying health, disease, patient care, and modes of therapy. Show your ability "
    "to apply the knowledge essential for medical practice. For the following multiple-choice "
    "question, select one correct answer from A to E. Base your answer on the current and "
    "standard practices referenced in medical guidelines.\n")
RELEASE_PROMPTS = {
    ("pubmedqa", 0): (
        "As an expert doctor in clinical science and medical knowledge, can you tell me if the "
        "following statement is correct? Answer yes, no, or maybe.\n"
        "Sixty adults with mild hypertension walked 30 minutes daily for 12 weeks.\n"
        "Resting heart rate fell by 6 beats per minute compared with controls.\n"
        "Does daily walking lower resting heart rate in adults with mild hypertension?\n"
        "The answer is:"),
    ("medqa", 0): (
        MEDQA_INSTRUCTION + "Question: A 45-year-old man has crushing chest pain radiating to the "
        "left arm. Which test should be done first?\n\nOptions:\nA. Electrocardiogram\n"
        "B. Chest CT\nC. Echocardiogram\nD. Stress test\nE. Coronary angiography\n\nThe answer is"),
    # A question ending in neither "?" nor "." gets a "?"; one ending in "." is kept.
    ("medqa", 1): (
        MEDQA_INSTRUCTION + "Question: A 6-year-old girl has a barking cough and inspiratory "
        "stridor. The most likely cause is?\n\nOptions:\nA. Bacterial tracheitis\n"
        "B. Parainfluenza virus\nC. Epiglottitis\nD. Foreign body\nE. Asthma\n\nThe answer is"),
    ("medqa", 2): (
        MEDQA_INSTRUCTION + "Question: Which vitamin deficiency causes scurvy.\n\nOptions:\n"
        "A. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\nE. Vitamin K\n\nThe answer is"),
    ("mednli", 0): (
        "TASK: Please classify the relationship between the given premise and hypothesis into one "
        "of the following labels: entailment, contradiction, or neutral. Return only the label.\n"
        "###\nINPUT: [PRE] Patient denies chest pain or shortness of breath. [HYP] Patient has no "
        "chest pain.\nOUTPUT:"),
    ("emrqa", 0): (
        "TASK: Given a medical context and an open-ended question related to it, extract the "
        "relevant text segment from the context as an answer. Expected output: Only extract and "
        "return the text segment from the provided context that directly answers the question. Do "
        "not add any new words.\n###\nContext: Patient was started on lisinopril 10 mg daily for "
        "hypertension. Follow up in two weeks.\nQuestion Why was the patient prescribed "
        "lisinopril?\nAnswer:"),
    ("mimic_cxr", 0): (
        "Derive the impression from findings in the radiology report.\n    INPUT: The lungs are "
        "clear. Heart size is normal. No pleural effusion.\n    OUTPUT:\n    "),
}


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory: pytest.TempPathFactory) -> str:
  work = tmp_path_factory.mktemp("mibe_vocab")
  text = resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"
  model = train_sentencepiece(str(text), work / "tok", 512)
  shutil.copyfile(model, work / "tokenizer.model")
  return str(work / "tokenizer.model")


def examples(name: str) -> list[dict]:
  return _read(name, TASKS[name])


@functools.cache
def _read(name: str, info: object) -> list[dict]:
  """A task's examples, read once per way it was built (``info``): tf.data is slow to start."""
  task = seqio.get_mixture_or_task(name)
  dataset = task.get_dataset(sequence_length=None, split="test", shuffle=False)
  return list(dataset.as_numpy_iterator())


@pytest.mark.parametrize("dataset,index", sorted(RELEASE_PROMPTS))
def test_release_prompt_is_exact(vocab_path: str, dataset: str, index: int):
  [name] = register_mibe_tasks(str(FIXTURES), vocab_path, datasets=[dataset])
  example = examples(name)[index]
  prompt = RELEASE_PROMPTS[dataset, index]
  assert example["inputs_pretokenized"].decode() == prompt
  vocabulary = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
  assert example["inputs"].tolist() == vocabulary.tokenizer.encode(prompt)
  assert example["inputs"].tolist()[0] == vocabulary.bos_id
  assert vocabulary.decode(example["targets"].tolist()) == example["targets_pretokenized"].decode()
  assert example["index"] == index


def test_fixed_variant_mends_the_release_typos(vocab_path: str):
  [emrqa, cxr] = register_mibe_tasks(str(FIXTURES), vocab_path, datasets=["emrqa", "mimic_cxr"],
                                     prompt_variant="fixed")
  assert "\nQuestion: Why was the patient" in examples(emrqa)[0]["inputs_pretokenized"].decode()
  assert examples(cxr)[0]["inputs_pretokenized"].decode() == (
      "Derive the impression from findings in the radiology report.\nINPUT: The lungs are clear. "
      "Heart size is normal. No pleural effusion.\nOUTPUT:\n")
  assert TASKS[emrqa].prompt_variant == "fixed"


def test_k_shot_prompts_are_deterministic(vocab_path: str):
  zero, two = register_mibe_tasks(str(FIXTURES), vocab_path, datasets=["medqa"], num_shots=(0, 2))
  assert (zero, two) == (task_name("medqa", 0), task_name("medqa", 2))
  first = [e["inputs_pretokenized"].decode() for e in examples(two)]
  register_mibe_tasks(str(FIXTURES), vocab_path, datasets=["medqa"], num_shots=(2,))
  assert [e["inputs_pretokenized"].decode() for e in examples(two)] == first
  for prompt, plain in zip(first, (e["inputs_pretokenized"].decode() for e in examples(zero))):
    blocks = prompt.split("\n\n" + MEDQA_INSTRUCTION)
    assert len(blocks) == 3 and prompt.endswith(plain)
    # Each demonstration is a training prompt with its answer letter.
    assert blocks[0].startswith(MEDQA_INSTRUCTION) and blocks[0][-2:] in (" A", " B", " C")
  other_seed = register_mibe_tasks(str(FIXTURES), vocab_path, datasets=["medqa"], num_shots=(2,),
                                   fewshot_seed=7)
  assert [e["inputs_pretokenized"].decode() for e in examples(other_seed[0])] != first


@pytest.mark.parametrize("dataset", sorted(datasets.SPECS))
def test_oracle_scores_one(vocab_path: str, dataset: str):
  [name] = register_mibe_tasks(str(FIXTURES), vocab_path, datasets=[dataset])
  task = seqio.get_mixture_or_task(name)
  rows = examples(name)
  targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True)
             for e in rows]
  predictions = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=False)
                 for e in rows]
  results = {}
  for metric_fn in task.predict_metric_fns:
    results.update(metric_fn(targets, predictions))
  scored = [k for k in results if k.startswith("fixed/") and k.split("/")[1] in ORACLE_KEYS]
  assert scored and all(results[k] == pytest.approx(1.0) for k in scored), results
  assert {k.split("/")[0] for k in results} == {"release", "fixed"}
  spec = datasets.SPECS[dataset]
  assert bool(task.score_metric_fns) == bool(spec.options)
  if spec.options:
    assert all(e["options"].astype(str).tolist() == list(spec.options) for e in rows)
    one_hot = [np.eye(len(spec.options))[spec.options.index(t)].tolist() for t in targets]
    [ranking] = task.score_metric_fns
    assert ranking(targets, one_hot)["loglikelihood/acc"] == 1.0


def test_missing_folder_names_dataset_and_source(vocab_path: str, tmp_path: Path):
  with pytest.raises(FileNotFoundError, match=r"'pubmedqa'.*github.com/pubmedqa/pubmedqa"):
    register_mibe_tasks(str(tmp_path), vocab_path, datasets=["pubmedqa"])
  with pytest.raises(FileNotFoundError, match=r"'mednli'.*PhysioNet"):
    register_mibe_tasks(str(tmp_path), vocab_path, datasets=["mednli"])
  shutil.copytree(FIXTURES / "ddi", tmp_path / "ddi", ignore=shutil.ignore_patterns("train*"))
  assert register_mibe_tasks(str(tmp_path), vocab_path, datasets=["ddi"]) == ["mibe_ddi_0shot"]
  with pytest.raises(FileNotFoundError, match=r"'ddi'.*few-shot pool"):
    register_mibe_tasks(str(tmp_path), vocab_path, datasets=["ddi"], num_shots=(3,))


def test_medqa_4_option_release_ranks_its_four_options(vocab_path: str, tmp_path: Path):
  shutil.copytree(FIXTURES / "as_released" / "medqa" / "4_options", tmp_path / "medqa")
  [name] = register_mibe_tasks(str(tmp_path), vocab_path, datasets=["medqa"], num_shots=(1,))
  task = seqio.get_mixture_or_task(name)
  rows = examples(name)
  assert [e["options"].astype(str).tolist() for e in rows] == [["A", "B", "C", "D"]] * 2
  assert all("from A to D." in e["inputs_pretokenized"].decode() for e in rows)
  targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True)
             for e in rows]
  assert targets == ["D", "B"]
  [ranking] = task.score_metric_fns
  assert ranking(targets, [[0, 0, 0, 1], [0, 1, 0, 0]])["loglikelihood/acc"] == 1.0
