"""medllama-contamination on Apache Beam's DirectRunner gives what the single-process scan gives.

Same inputs as ``test_contamination.py`` (its fixtures, with the planted overlaps): the report
(``contamination.json``, every field, and ``contamination.md``) and the decontaminated copy (every
shard file byte for byte, and ``stats.json``) are equal. The Beam run writes into the folders of the
single-process run (``--overwrite``), so even the paths the report names are the same. Only the
DirectRunner is run here; other runners get the same pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_contamination import M0, cli_args, write_inputs, write_jsonl

from medllama_jax.cli import contamination as cli
from medllama_jax.data import records

BEAM = ("--runner", "DirectRunner")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
  return write_inputs(tmp_path_factory.mktemp("contamination"))


def run_and_read(argv: list[str], out: str, copy: str | None, capsys) -> dict[str, object]:
  """Runs the CLI; returns what it printed and every file it wrote, by path, as bytes."""
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  folders = [out] + ([copy] if copy else [])
  return {"printed": printed,
          **{str(path.relative_to(folder)): path.read_bytes()
             for folder in folders for path in sorted(Path(folder).rglob("*")) if path.is_file()}}


# A small lookup batch: batches hold several documents, and documents cross batch boundaries.
# n = 1: every document overlaps, so the copy's splits are all empty shards.
@pytest.mark.parametrize("options", [("--batch_words", "5"), ("--n", "1")])
def test_beam_report_and_copy_equal_the_single_process_ones(inputs, tmp_path, capsys, options):
  out, copy = str(tmp_path / "report"), str(tmp_path / "clean")
  # A second prepared corpus (three shards per split), so two copies are written.
  web_pages = str(tmp_path / "web_pages")
  records.prepare("jsonl", [inputs["raw"].partition(":")[2]], web_pages, num_shards=3,
                  validation_fraction=0.5)
  argv = cli_args(inputs, out, *options, "--prepared", web_pages, "--write_decontaminated", copy)
  single = run_and_read(argv, out, copy, capsys)
  beam = run_and_read([*argv, "--overwrite", *BEAM], out, copy, capsys)
  assert sorted(beam) == sorted(single)
  assert "contamination.json" in beam and "web_pages/stats.json" in beam
  assert len([name for name in beam if ".tfrecord-" in name]) == 4 + 6
  for name in single:
    assert beam[name] == single[name], name
  written = json.loads(beam["pubmed_abstracts/stats.json"])["records_written"]
  assert (sum(written.values()) == 0) == (options[0] == "--n")


def test_ties_across_files_rank_in_read_order_on_beam(inputs, tmp_path, capsys):
  """Two raw files hold M0's premise twice each (a four-way tie): the two listed are the two read
  first, in that order, whichever worker finishes first."""
  raw_dir = tmp_path / "raw"
  raw_dir.mkdir()
  for name in ("b.jsonl", "a.jsonl"):
    write_jsonl(raw_dir / name, [{"text": "Filler line about the weather today."},
                                 {"text": M0}, {"text": "Second copy. " + M0}])
  out = str(tmp_path / "report")
  argv = ["--data_dir", inputs["mibe"], "--tasks", "mednli", "--out", out, "--top_documents",
          "2", "--raw", f"jsonl:{raw_dir}/*.jsonl"]
  single = run_and_read(argv, out, None, capsys)
  shutil.rmtree(out)
  beam = run_and_read([*argv, *BEAM, "--direct_num_workers", "2"], out, None, capsys)
  assert beam == single
  top = json.loads(beam["contamination.json"])["datasets"]["mednli"]["top_documents"]
  assert [(m["id"], m["shared_ngrams"]) for m in top] == [("a.jsonl:2", 4), ("a.jsonl:3", 4)]


def test_beam_options_without_runner_are_a_usage_error(inputs, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(cli_args(inputs, str(tmp_path / "out"), "--project", "p"))
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "--project p" in error and "--runner" in error


@pytest.mark.parametrize("broken", ["prepared", "copy_not_empty"])
def test_bad_input_is_one_line_on_beam(inputs, tmp_path, capsys, broken):
  out, copy = str(tmp_path / "out"), str(tmp_path / "clean")
  argv = cli_args(inputs, out, "--write_decontaminated", copy, *BEAM)
  if broken == "prepared":
    missing = str(tmp_path / "nowhere")
    argv[argv.index(inputs["prepared"])] = missing
  else:
    missing = os.path.join(copy, "pubmed_abstracts")
    os.makedirs(missing)
    Path(missing, "notes.txt").write_text("earlier work", encoding="utf-8")
  assert cli.main(argv) == 1
  (error,) = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("medllama-contamination")]
  assert missing in error
  assert not os.path.exists(out)
