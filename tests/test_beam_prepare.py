"""The Beam corpus preparer writes what the single-process preparer writes, on Beam's DirectRunner.

Equality is byte for byte: the same shard files with the same records in the same order, the same
``stats.json`` and ``token_stats.json``. Only the DirectRunner runs here; the other runners execute the
same pipeline graph (no runner-specific code), but their distribution of work over machines is not
exercised.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import random
import shutil
import tarfile

import pytest
import tensorflow as tf

import tokenizer_families as families
from medllama_jax.data import beam_options, beam_prepare, corpora, records, token_stats
from medllama_jax.data.near_duplicates import NearDuplicateSettings
from medllama_jax.data.vocab import model_vocabulary

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "medllama_jax" / "demo_data" / "corpora"
FIXTURES = ROOT / "tests" / "fixtures" / "corpora"

# Every format on the samples shipped in the repository (the demo's and the tests' own), two inputs
# each where there are two, so that documents of several inputs share splits and shards.
SHIPPED = {
    "pubmed_xml": [DEMO / "pubmed_sample.xml.gz", FIXTURES / "pubmed" / "pubmed99n0001.xml.gz"],
    "pmc_nxml": [DEMO / "pmc_oa_sample", FIXTURES / "pmc_nxml"],
    "pmc_txt": [FIXTURES / "pmc_txt", FIXTURES / "pmc_txt_bulk"],
    "jsonl": [DEMO / "redpajama_sample.jsonl", FIXTURES / "jsonl" / "pile_sample.jsonl"],
    "mimic_iii_notes": [DEMO / "mimic_iii_noteevents_sample.csv.gz",
                        FIXTURES / "mimic-iii" / "NOTEEVENTS.csv.gz"],
    "mimic_iv_notes": [DEMO / "mimic_iv_discharge_sample.csv.gz",
                       FIXTURES / "mimic-iv-note" / "discharge.csv.gz"],
    "mimic_cxr": [DEMO / "mimic_cxr_sample" / "files", FIXTURES / "mimic-cxr" / "files"],
}


def direct_runner():
  return beam_options.pipeline_options("DirectRunner")


def load_cli():
  spec = importlib.util.spec_from_file_location("prepare_corpus", ROOT / "scripts" / "prepare_corpus.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  return cli


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file of a folder (hidden ones too: nothing half-written may stay behind)."""
  return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def prepare_both(fmt, inputs, tmp_path, **settings):
  """The single-process and the Beam preparer's summaries and folders, on the same inputs."""
  inputs = [str(path) for path in inputs]
  single = records.prepare(fmt, inputs, str(tmp_path / "single"), **settings)
  beam = beam_prepare.prepare(fmt, inputs, str(tmp_path / "beam"),
                              pipeline_options=direct_runner(), **settings)
  return (single, folder_bytes(tmp_path / "single")), (beam, folder_bytes(tmp_path / "beam"))


@pytest.mark.parametrize("fmt", sorted(SHIPPED))
def test_direct_runner_writes_what_one_process_writes_on_the_shipped_samples(fmt, tmp_path):
  (single, single_files), (beam, beam_files) = prepare_both(
      fmt, SHIPPED[fmt], tmp_path, num_shards=3, validation_fraction=0.3)
  assert beam == single
  assert beam_files == single_files
  assert sum(beam["records_written"].values()) > 0
  assert sorted(beam_files) == sorted(
      [records.STATS_FILE, *(records.shard_name(split, i, 3)
                             for split in ("train", "validation") for i in range(3))])


def upload(local: pathlib.Path, remote: str) -> str:
  """A copy of a file or folder tree under ``remote``, a path of TensorFlow's in-memory file system,
  which stands in for a bucket (``gs://``): both are reached through ``tf.io.gfile``."""
  if local.is_file():
    tf.io.gfile.makedirs(os.path.dirname(remote))
    tf.io.gfile.copy(str(local), remote, overwrite=True)
  else:
    for path in local.rglob("*"):
      if path.is_file():
        upload(path, f"{remote}/{path.relative_to(local).as_posix()}")
  return remote


@pytest.mark.parametrize("fmt", sorted(SHIPPED))
def test_inputs_and_output_in_a_bucket(fmt, tmp_path):
  """What a Dataflow job reads and writes: inputs (found by a glob) and the output folder behind a
  bucket URL; the shards equal those prepared from local files."""
  bucket = f"ram://test_inputs_and_output_in_a_bucket/{fmt}"
  for i, path in enumerate(SHIPPED[fmt]):
    upload(path, f"{bucket}/raw/input{i}/{path.name}")
  single = records.prepare(fmt, [str(path) for path in SHIPPED[fmt]], str(tmp_path / "single"),
                           num_shards=2, validation_fraction=0.3)
  beam = beam_prepare.prepare(fmt, [f"{bucket}/raw/input*/*"], f"{bucket}/out", num_shards=2,
                              validation_fraction=0.3, pipeline_options=direct_runner())
  assert beam["inputs"] == [f"{bucket}/raw/input{i}/{path.name}"
                            for i, path in enumerate(SHIPPED[fmt])]
  assert {**beam, "inputs": None} == {**single, "inputs": None}
  names = sorted(path.name for path in (tmp_path / "single").iterdir())
  assert sorted(tf.io.gfile.listdir(f"{bucket}/out")) == names
  for name in names:
    if name != records.STATS_FILE:  # It names the inputs.
      with tf.io.gfile.GFile(f"{bucket}/out/{name}", "rb") as f:
        assert f.read() == (tmp_path / "single" / name).read_bytes(), name


def test_packages_in_a_bucket(tmp_path):
  """A tar.gz PMC package with its file list beside it (retractions), and a zip of MIMIC-CXR reports
  (the release's own packaging), read from a bucket."""
  bulk = FIXTURES / "pmc_txt_bulk"
  package = tmp_path / "oa_comm_txt.PMC009xxxxxx.baseline.2025-06-26.tar.gz"
  with tarfile.open(package, "w:gz") as tar:
    tar.add(bulk / "PMC009xxxxxx", arcname="PMC009xxxxxx")
  file_list = next(bulk.glob("*.filelist.csv"))
  shutil.copy(file_list, tmp_path / file_list.name)
  reports = pathlib.Path(shutil.make_archive(str(tmp_path / "mimic-cxr-reports"), "zip",
                                             DEMO / "mimic_cxr_sample"))
  bucket = "ram://test_packages_in_a_bucket"
  for fmt, local in [("pmc_txt", package), ("mimic_cxr", reports)]:
    remote = upload(local, f"{bucket}/raw/{local.name}")
    if fmt == "pmc_txt":
      upload(file_list, f"{bucket}/raw/{file_list.name}")
    single = records.prepare(fmt, [str(local)], str(tmp_path / fmt), num_shards=1)
    beam = beam_prepare.prepare(fmt, [remote], f"{bucket}/{fmt}", num_shards=1,
                                pipeline_options=direct_runner())
    assert {**beam, "inputs": None} == {**single, "inputs": None}
    assert beam["records_written"]["train"] > 0
    assert beam["skipped"] == ({"retracted": 1} if fmt == "pmc_txt" else {})
    name = records.shard_name("train", 0, 1)
    with tf.io.gfile.GFile(f"{bucket}/{fmt}/{name}", "rb") as f:
      assert f.read() == (tmp_path / fmt / name).read_bytes()


def jsonl(path: pathlib.Path, texts: list[str]) -> pathlib.Path:
  path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
  return path


def test_duplicates_across_input_files_are_removed_and_the_first_copy_kept(tmp_path):
  texts = [f"Invented abstract number {i:03d}, about an imaginary trial." for i in range(30)]
  raw = tmp_path / "raw"
  raw.mkdir()
  # c.jsonl sorts last but is given first: input order, not file-name order, decides the first copy.
  first = jsonl(raw / "c.jsonl", texts[:10] + [texts[3]])
  second = jsonl(raw / "a.jsonl", texts[5:20] + [texts[0], texts[12].replace(" ", "   ")])
  third = jsonl(raw / "b.jsonl", texts[18:30] + texts[:2])
  (single, single_files), (beam, beam_files) = prepare_both(
      "jsonl", [first, second, third], tmp_path, num_shards=4, validation_fraction=0.25)
  assert beam == single
  assert beam_files == single_files
  # Within c.jsonl: 1; a.jsonl repeats 5 of c's, its own 12th (after cleaning) and c's 0th; b.jsonl
  # repeats 2 of a's and 2 of c's.
  assert beam["duplicates"] == 1 + 5 + 2 + 2 + 2
  assert sum(beam["records_written"].values()) == 30
  written = {r["id"] for split, pattern in records.split_file_patterns(str(tmp_path / "beam")).items()
             for r in records.read_records(pattern)}
  assert written == ({f"c.jsonl:{i + 1}" for i in range(10)}
                     | {f"a.jsonl:{i + 1}" for i in range(5, 15)}
                     | {f"b.jsonl:{i + 1}" for i in range(2, 12)})


def test_near_duplicates_across_input_files_are_removed_by_both_engines(tmp_path):
  """Each of ten documents is followed, in later files, by a copy with one word of 300 edited
  (Jaccard about 0.97: LSH makes them candidates with probability 0.9999) or with 120 edited (about
  0.05): the first are removed, the second kept."""
  rng = random.Random(0)
  originals = [[f"w{rng.randrange(3000)}" for _ in range(300)] for _ in range(10)]

  def edit(words, count):
    copy = list(words)
    for i in rng.sample(range(len(copy)), count):
      copy[i] = f"edit{rng.randrange(10**9)}"
    return " ".join(copy)

  raw = tmp_path / "raw"
  raw.mkdir()
  inputs = [jsonl(raw / "a.jsonl", [" ".join(words) for words in originals]),
            jsonl(raw / "b.jsonl", [edit(words, 1) for words in originals[:6]]
                  + [edit(words, 120) for words in originals[6:]]),
            jsonl(raw / "c.jsonl", [edit(words, 1) for words in originals[6:]])]
  settings = NearDuplicateSettings(threshold=0.8)
  (single, single_files), (beam, beam_files) = prepare_both(
      "jsonl", inputs, tmp_path, num_shards=3, validation_fraction=0.3, near_duplicates=settings)
  assert beam == single
  assert beam_files == single_files
  assert beam["near_duplicates"] == {**settings.describe(), "removed": 10}
  written = {r["id"] for pattern in records.split_file_patterns(str(tmp_path / "beam")).values()
             for r in records.read_records(pattern)}
  assert written == ({f"a.jsonl:{i}" for i in range(1, 11)}
                     | {f"b.jsonl:{i}" for i in range(7, 11)})
  off = records.prepare("jsonl", [str(path) for path in inputs], str(tmp_path / "off"))
  assert "near_duplicates" not in off and sum(off["records_written"].values()) == 24


@pytest.mark.parametrize("max_errors, one_process_saw", [(0.1, "1 of 9 records (11.11%)"),
                                                         (0, "1 of 5 records (20.00%)")])
def test_too_many_errors_leave_the_folder_empty(max_errors, one_process_saw, tmp_path):
  """A fraction is checked at the end by both; a count stops the single process at the first error
  past it, while Beam checks it once every input is read and so reports the whole corpus."""
  raw = tmp_path / "raw"
  raw.mkdir()
  good = [f"Invented document number {i:03d}, long enough to keep." for i in range(8)]
  (raw / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good[:4]) + "{bad\n")
  jsonl(raw / "b.jsonl", good[4:])
  inputs = [str(raw / "*.jsonl")]
  messages = []
  for name, prepare in [("single", records.prepare), ("beam", beam_prepare.prepare)]:
    options = {"pipeline_options": direct_runner()} if name == "beam" else {}
    with pytest.raises(corpora.CorpusError, match="too many errors, nothing written") as error:
      prepare("jsonl", inputs, str(tmp_path / name), num_shards=2, max_errors=max_errors,
              **options)
    messages.append(str(error.value).replace(str(tmp_path / name), "OUT"))
    assert os.listdir(tmp_path / name) == []
  assert messages[0] == messages[1].replace("1 of 9 records (11.11%)", one_process_saw)
  assert "1 of 9 records (11.11%)" in messages[1]
  assert "(bad_json 1; first: " in messages[1] and "a.jsonl at line 5)" in messages[1]


def test_token_counts_equal_count_tokens(tmp_path):
  vocabulary = model_vocabulary(str(families.build("sentencepiece_llama2", tmp_path / "tok")))
  (single, single_files), (beam, beam_files) = prepare_both(
      "jsonl", SHIPPED["jsonl"], tmp_path, num_shards=2, validation_fraction=0.3,
      vocabulary=vocabulary)
  assert beam == single
  assert beam_files == single_files
  counted = token_stats.count_tokens(str(tmp_path / "beam"), vocabulary)
  assert token_stats.read_token_stats(str(tmp_path / "beam"), vocabulary) == counted
  assert beam["tokens"] == {split: entry["tokens"] for split, entry in counted["splits"].items()}
  assert all(beam["tokens"][split] > beam["records_written"][split] for split in beam["tokens"])


def test_an_overwritten_folder_keeps_no_token_counts_of_the_old_corpus(tmp_path):
  vocabulary = model_vocabulary(str(families.build("sentencepiece_llama2", tmp_path / "tok")))
  out = str(tmp_path / "out")
  records.prepare("jsonl", [str(SHIPPED["jsonl"][0])], out, num_shards=1, vocabulary=vocabulary)
  beam_prepare.prepare("jsonl", [str(SHIPPED["jsonl"][1])], out, num_shards=1, overwrite=True,
                       pipeline_options=direct_runner())
  assert not os.path.exists(os.path.join(out, token_stats.TOKEN_STATS_FILE))


def test_cli_runs_on_the_runner_it_names_and_passes_beam_options_through(tmp_path, capsys):
  cli = load_cli()
  common = ["--format", "jsonl", "--num_shards", "2", "--validation_fraction", "0.3",
            *(arg for path in SHIPPED["jsonl"] for arg in ("--input", str(path)))]
  assert cli.main([*common, "--out", str(tmp_path / "single")]) == 0
  single = json.loads(capsys.readouterr().out)
  assert cli.main([*common, "--out", str(tmp_path / "beam"), "--runner", "DirectRunner",
                   "--direct_num_workers", "2", "--direct_running_mode", "multi_threading"]) == 0
  assert json.loads(capsys.readouterr().out) == single
  assert "near_duplicates" not in single
  assert folder_bytes(tmp_path / "beam") == folder_bytes(tmp_path / "single")


def test_cli_near_duplicate_settings(tmp_path, capsys):
  cli = load_cli()
  assert cli.main(["--format", "jsonl", "--input", str(SHIPPED["jsonl"][0]), "--out",
                   str(tmp_path / "o"), "--near_duplicates", "0.7", "--shingle_words", "3",
                   "--minhash_permutations", "64", "--runner", "DirectRunner"]) == 0
  stats = json.loads(capsys.readouterr().out)
  bands, rows = NearDuplicateSettings(0.7, 3, 64).layout
  assert stats["near_duplicates"] == {"threshold": 0.7, "shingle_words": 3, "permutations": 64,
                                      "bands": bands, "rows": rows, "removed": 0}
  assert cli.main(["--format", "jsonl", "--input", str(SHIPPED["jsonl"][0]), "--out",
                   str(tmp_path / "bad"), "--near_duplicates", "1.5"]) == 1
  assert capsys.readouterr().err.startswith(
      "prepare_corpus: error: near duplicates need 0 < threshold <= 1")


def test_cli_refuses_beam_options_without_a_runner(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit:
    load_cli().main(["--format", "jsonl", "--input", str(SHIPPED["jsonl"][0]),
                     "--out", str(tmp_path / "o"), "--direct_num_workers", "2"])
  assert exit.value.code == 2
  err = capsys.readouterr().err
  assert err == ("prepare_corpus: error: unrecognized arguments: --direct_num_workers 2 (Beam "
                 "pipeline options need --runner) (see prepare_corpus --help)\n")
  assert not (tmp_path / "o").exists()
