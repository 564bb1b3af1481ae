"""Corpus preparation: each raw format's reader, rejections, cleaning, dedup, split, shards and the CLI.

The fixtures under fixtures/corpora/ follow the real schemas (MEDLINE XML, JATS, Pile/RedPajama JSON
lines, MIMIC-III/IV note CSVs, the MIMIC-CXR tree) but every text in them is invented. Records that
must never reach a log carry a ``SECRET-`` marker.
"""

import gzip
import importlib.util
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib

import pytest

from medllama_jax.data import corpora, records
from medllama_jax.data.corpora import Document, Rejected

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "corpora"
PUBMED = str(FIXTURES / "pubmed" / "pubmed99n0001.xml.gz")
JSONL = str(FIXTURES / "jsonl" / "pile_sample.jsonl")
MIMIC_III = str(FIXTURES / "mimic-iii" / "NOTEEVENTS.csv.gz")
MIMIC_IV = str(FIXTURES / "mimic-iv-note" / "discharge.csv.gz")
MIMIC_III_BROKEN = str(FIXTURES / "mimic-iii-broken" / "NOTEEVENTS.csv.gz")

MIMIC_III_9001 = ("Admission Date:  [**2101-1-1**]              Discharge Date:   [**2101-1-5**]\n\n"
                  "Service: MEDICINE\n\nHistory of Present Illness:\n"
                  "Invented patient with a made-up \"fictional\" fever.\n\n\n\n"
                  "Discharge Condition: synthetic and stable.\n")
MIMIC_III_9004 = "Invented progress note: imaginary vitals stable, no new findings.\n"
MIMIC_III_9005 = MIMIC_III_9001.replace("\n\n\n\n", "\n\n")
# The words of every clinical note in the fixtures, none of which may appear in a log or a summary.
CLINICAL_WORDS = ("SECRET", "Invented patient", "progress note", "Discharge Condition", "[**2101")


def read(fmt, path, **options):
  return list(corpora.read(fmt, str(path), **options))


def load_cli():
  """scripts/prepare_corpus.py as a module."""
  spec = importlib.util.spec_from_file_location("prepare_corpus", ROOT / "scripts" / "prepare_corpus.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  return cli


def gzip_bytes(data: bytes) -> bytes:
  return gzip.compress(data, mtime=0)


@pytest.fixture(name="absl_logs")
def absl_logs_fixture(caplog):
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


# Readers, one per format.

def test_pubmed_xml_titles_labels_inline_markup_and_rejections():
  assert read("pubmed_xml", PUBMED) == [
      Document("pmid:90000001",
               "Effect of Fictobacter imaginarius on serum markers in a synthetic cohort.\n"
               "BACKGROUND: Invented infections raise the made-up marker Q2 in imaginary patients.\n"
               "METHODS: We measured Q2 at 103 cells per litre.\n"
               "CONCLUSIONS: The marker fell after fictional treatment."),
      Document("pmid:90000002", "A synthetic note on imaginary dosing.\n"
               "Unlabelled abstract text about an invented drug and its made-up half-life."),
      Rejected(PUBMED, "PubmedArticle 3 (pmid:90000003)", "no_abstract"),
      Rejected(PUBMED, "PubmedArticle 4", "no_pmid"),
  ]


def test_pubmed_xml_not_well_formed_keeps_earlier_articles(tmp_path):
  good = ("<PubmedArticle><MedlineCitation><PMID>1</PMID><Article><ArticleTitle>T</ArticleTitle>"
          "<Abstract><AbstractText>Invented abstract.</AbstractText></Abstract></Article>"
          "</MedlineCitation></PubmedArticle>")
  broken = "<PubmedArticle><MedlineCitation><PMID>2</PMID></PubmedArticle>"
  path = tmp_path / "pubmed99n0002.xml.gz"
  path.write_bytes(gzip_bytes(f"<PubmedArticleSet>\n{good}\n{broken}\n</PubmedArticleSet>\n".encode()))
  assert read("pubmed_xml", path) == [
      Document("pmid:1", "T\nInvented abstract."),
      Rejected(str(path), "line 3, column 48", "bad_xml"),
  ]


def test_pmc_nxml_sections_kept_tables_figures_formulas_references_dropped():
  folder = FIXTURES / "pmc_nxml"
  assert read("pmc_nxml", folder) == [
      Document("pmcid:PMC9000001",
               "Imaginary Fictobacter growth in synthetic media\n\n"
               "Background\n\nInvented organisms grow in made-up broth.\n\n"
               "Results\n\nGrowth doubled at 37°C.\n\n"
               "Introduction\n\n"
               "Fictional bacteria were first described in an invented study [1] and grow when holds.\n\n"
               "Subsection on media\n\nThe broth was entirely synthetic.\n\n"
               "Conclusion\n\nNothing here is real."),
      Rejected(str(folder), "broken.nxml line 7, column 8", "bad_xml"),
      Document("extra/article_without_pmcid.nxml", "A case report without a PMC identifier\n\n"
               "An invented patient recovered from an imaginary illness."),
  ]


def test_pmc_txt_from_tar_gz_and_folder(tmp_path):
  folder = FIXTURES / "pmc_txt"
  package = tmp_path / "oa_comm_txt.PMC009xxxxxx.baseline.tar.gz"
  with tarfile.open(package, "w:gz") as tar:
    tar.add(folder / "PMC009xxxxxx", arcname="PMC009xxxxxx")
    for name, data in [("PMC009xxxxxx/PMC9000005.txt", b"\xff\xfe not UTF-8 SECRET-TXT"),
                       ("PMC009xxxxxx/PMC9000003.pdf", b"%PDF ignored")]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  expected = [
      Document("PMC009xxxxxx/PMC9000003.txt", "Imaginary Fictobacter growth in synthetic media\n\n"
               "Invented organisms grow in made-up broth.\n\nIntroduction\n"
               "Fictional bacteria were first described in an invented study.\n"),
      Document("PMC009xxxxxx/PMC9000004.txt", "A second synthetic article\n\n"
               "Its body is a short paragraph of invented prose about nothing real.\n"),
  ]
  assert read("pmc_txt", package) == expected + [
      Rejected(str(package), "PMC009xxxxxx/PMC9000005.txt", "not_utf8")]
  assert read("pmc_txt", folder) == expected


def test_pmc_txt_bulk_package_markers_front_matter_references_and_retractions(tmp_path):
  bulk = FIXTURES / "pmc_txt_bulk"
  stem = "oa_comm_txt.PMC009xxxxxx.baseline.2025-06-26"
  package = tmp_path / f"{stem}.tar.gz"
  with tarfile.open(package, "w:gz") as tar:
    tar.add(bulk / "PMC009xxxxxx", arcname="PMC009xxxxxx")
  shutil.copy(bulk / f"{stem}.filelist.csv", tmp_path)
  expected = [
      Document("PMC009xxxxxx/PMC9000006.txt",
               "Imaginary Fictobacter resistance in a made-up ward\n"
               "1 Department of Invented Studies, Fictional University, Nowhere\n"
               "Background: invented organisms resisted made-up drugs in a synthetic ward.\n"
               "Results: resistance doubled within imaginary weeks.\n\n"
               "Introduction\nFictional bacteria were first described in an invented study [1].\n\n"
               "Conclusion\nNothing here is real.\n"),
      Document("PMC009xxxxxx/PMC9000007.txt",
               "Retraction: Imaginary Fictobacter growth in synthetic media\n\n"
               "The invented journal retracts the made-up article at the fictional authors' request.\n"),
  ]
  assert read("pmc_txt", package) == expected + [
      Rejected(str(package), "PMC009xxxxxx/PMC9000008.txt", "retracted")]
  assert read("pmc_txt", bulk) == expected + [
      Rejected(str(bulk), "PMC009xxxxxx/PMC9000008.txt", "retracted")]
  stats = records.prepare("pmc_txt", [str(package)], str(tmp_path / "out"), num_shards=1,
                          validation_fraction=0)
  assert (stats["skipped"], stats["errors"], stats["records_written"]) == (
      {"retracted": 1}, {}, {"train": 2})


def test_pmc_txt_file_list_without_retracted_column_is_refused(tmp_path):
  folder = tmp_path / "txt"
  shutil.copytree(FIXTURES / "pmc_txt_bulk" / "PMC009xxxxxx", folder / "PMC009xxxxxx")
  (folder / "filelist.csv").write_text("Article File,AccessionID\nPMC009xxxxxx/PMC9000006.txt,PMC9000006\n")
  with pytest.raises(corpora.CorpusError, match=r"filelist\.csv: not a PMC file list \(no Retracted"):
    read("pmc_txt", folder)


def test_jsonl_pile_and_redpajama_lines_with_malformed_ones_reported():
  assert read("jsonl", JSONL) == [
      Document("pile_sample.jsonl:1",
               "Synthetic abstract: an invented enzyme cleaves a made-up substrate."),
      Document("pile_sample.jsonl:2", "def invented():\n    return 42\n"),
      Document("pile_sample.jsonl:3", "Synthetic full text: imaginary cells divide in fictional tissue."),
      Rejected(JSONL, "line 4", "bad_json"),
      Rejected(JSONL, "line 5", "no_text"),
      Document("pile_sample.jsonl:7",
               "RedPajama style page about an invented hospital and its made-up wards."),
      Rejected(JSONL, "line 8", "no_text"),
      Rejected(JSONL, "line 9", "not_utf8"),
  ]


def test_jsonl_pile_set_name_filter():
  got = read("jsonl", JSONL, pile_set_name=["PubMed Abstracts", "pubmed central"])
  assert [r.id for r in got if isinstance(r, Document)] == ["pile_sample.jsonl:1", "pile_sample.jsonl:3"]
  assert [(r.location, r.reason) for r in got if isinstance(r, Rejected)] == [
      ("line 2", "not_selected"), ("line 4", "bad_json"), ("line 5", "no_text"),
      ("line 7", "not_selected"), ("line 8", "no_text"), ("line 9", "not_utf8")]


def test_truncated_gzip_is_reported_and_earlier_records_kept(tmp_path):
  path = tmp_path / "00.jsonl.gz"
  lines = [json.dumps({"text": f"invented document {i}"}).encode() + b"\n" for i in range(4)]
  with open(path, "wb") as raw:
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
      f.write(b"".join(lines[:3]))
      f.flush(zlib.Z_FULL_FLUSH)
      complete = raw.tell()
      f.write(lines[3] * 50)
  path.write_bytes(path.read_bytes()[:complete + 20])
  assert read("jsonl", path) == [
      Document(f"00.jsonl.gz:{i + 1}", f"invented document {i}") for i in range(3)
  ] + [Rejected(str(path), "after 3 records", "truncated_file")]


def test_zst_needs_zstandard(tmp_path, monkeypatch):
  path = tmp_path / "00.jsonl.zst"
  path.write_bytes(b"\x28\xb5\x2f\xfd")
  monkeypatch.setitem(sys.modules, "zstandard", None)
  with pytest.raises(corpora.CorpusError, match=r"00\.jsonl\.zst: .*needs the optional 'zstandard'"):
    read("jsonl", path)


def test_zst_jsonl_frames_and_truncation(tmp_path):
  zstandard = pytest.importorskip("zstandard")
  lines = [json.dumps({"text": f"invented {i}"}).encode() + b"\n" for i in range(3)]
  frames = [zstandard.ZstdCompressor().compress(b"".join(lines[:2])),
            zstandard.ZstdCompressor().compress(lines[2])]
  path = tmp_path / "00.jsonl.zst"
  path.write_bytes(b"".join(frames))
  documents = [Document(f"00.jsonl.zst:{i + 1}", f"invented {i}") for i in range(3)]
  assert read("jsonl", path) == documents
  path.write_bytes(frames[0] + frames[1][:-4])
  assert read("jsonl", path) == documents[:2] + [
      Rejected(str(path), "after 2 records", "truncated_file")]


def test_mimic_iii_notes_iserror_skipped_short_row_reported():
  assert read("mimic_iii_notes", MIMIC_III) == [
      Document("mimic3:9001", MIMIC_III_9001),
      Rejected(MIMIC_III, "row 2 (line 13)", "iserror"),
      Rejected(MIMIC_III, "row 3 (line 15)", "wrong_field_count"),
      Document("mimic3:9004", MIMIC_III_9004),
      Document("mimic3:9005", MIMIC_III_9005),
      Document("mimic3:9006", "SECRET-MIMIC3-SHORT ok."),
  ]


def test_mimic_iii_broken_quotes_cost_one_note_each_and_later_rows_are_kept():
  got = read("mimic_iii_notes", MIMIC_III_BROKEN)
  assert got == [
      Document("mimic3:9101", "Invented nursing note: the synthetic patient\n1,200,000 imaginary units "
               "were charted, a line that starts like a row but is not one.\n"),
      Rejected(MIMIC_III_BROKEN, "row 2 (line 5)", "unterminated_quote"),
      Document("mimic3:9103", "Invented progress note after the damage,\nwith a second line.\n"),
      Rejected(MIMIC_III_BROKEN, "row 4 (line 10)", "bad_quoting"),
      Document("mimic3:9105", "Invented discharge summary, the last note of the file.\n"),
      Rejected(MIMIC_III_BROKEN, "row 6 (line 13)", "unterminated_quote"),
  ]
  assert not any("SECRET" in r.text for r in got if isinstance(r, Document))


def test_mimic_iii_category_filter_ignores_case_and_padding():
  got = read("mimic_iii_notes", MIMIC_III, mimic_category="physician")
  assert [r.id for r in got if isinstance(r, Document)] == ["mimic3:9004"]
  assert [r.reason for r in got if isinstance(r, Rejected)] == [
      "not_selected", "iserror", "wrong_field_count", "not_selected", "not_selected"]


def test_mimic_iii_without_text_column_rejects_the_file(tmp_path):
  path = tmp_path / "NOTEEVENTS.csv"
  path.write_text('"ROW_ID","SUBJECT_ID","CATEGORY","ISERROR"\n1,2,"Nursing",\n')
  assert read("mimic_iii_notes", path) == [Rejected(str(path), "header (no text)", "missing_columns")]


def test_mimic_iv_notes():
  assert read("mimic_iv_notes", MIMIC_IV) == [
      Document("mimic4:19000001-DS-1",
               " \nName:  ___                     Unit No:   ___\n \n"
               "Admission Date:  ___              Discharge Date:   ___\n \n"
               "Chief Complaint:\nInvented abdominal pain in a synthetic patient.\n"),
      Rejected(MIMIC_IV, "row 2 (line 10)", "no_id"),
      Rejected(MIMIC_IV, "row 3 (line 11)", "wrong_field_count"),
      Document("mimic4:19000004-DS-4",
               "Discharge Instructions:\nTake the invented medicine twice daily."),
  ]


def test_mimic_cxr_tree_and_zip(tmp_path):
  tree = tmp_path / "mimic-cxr"
  shutil.copytree(FIXTURES / "mimic-cxr", tree)
  (tree / "files/p11/p11000011/s50000004.txt").write_bytes(b"FINAL REPORT \xe9\xff SECRET-CXR")
  (tree / "files/p11/notes.txt").write_text("not a report")
  reports = [("cxr:50000001", "files/p10/p10000032/s50000001.txt"),
             ("cxr:50000002", "files/p10/p10000032/s50000002.txt"),
             ("cxr:50000003", "files/p11/p11000011/s50000003.txt")]
  expected = [Document(study, (FIXTURES / "mimic-cxr" / name).read_text()) for study, name in reports]
  assert expected[2].text == (
      "                                 FINAL REPORT\n"
      " PORTABLE CHEST:  Stable invented cardiomegaly; no new synthetic opacity.\n")
  assert read("mimic_cxr", tree) == expected[:2] + [
      Rejected(str(tree), "files/p11/notes.txt", "not_a_report"),
      expected[2],
      Rejected(str(tree), "files/p11/p11000011/s50000004.txt", "not_utf8"),
  ]
  package = tmp_path / "mimic-cxr-reports.zip"
  with zipfile.ZipFile(package, "w") as z:
    for name in ("files/p10/p10000032/s50000001.txt", "files/p11/p11000011/s50000004.txt"):
      z.write(tree / name, name)
  assert read("mimic_cxr", package) == [
      expected[0], Rejected(str(package), "files/p11/p11000011/s50000004.txt", "not_utf8")]


def test_unknown_format_and_option():
  with pytest.raises(ValueError, match="unknown format 'pubmed'"):
    corpora.check_options("pubmed", {})
  with pytest.raises(ValueError, match="'mimic_cxr' does not take mimic_category"):
    corpora.check_options("mimic_cxr", {"mimic_category": "Radiology"})
  corpora.check_options("jsonl", {"pile_set_name": "PubMed Central"})


# Cleaning and splitting.

def test_clean_text():
  raw = "  Cafe\u0301\t\t au  lait \r\n\r\n\r\n\r\nline\x00two\x1b[0m\x85\n \n \nend \t"
  assert records.clean_text(raw) == "Café au lait\n\nlinetwo[0m\n\nend"
  assert records.clean_text("a\tb\n\nc\rd") == "a b\n\nc\nd"
  assert records.clean_text("Seen on [**2101-1-1**] by Dr. [**Last Name (NamePattern1) **].") == (
      "Seen on [**2101-1-1**] by Dr. [**Last Name (NamePattern1) **].")


def test_split_is_deterministic_and_by_id():
  # Pinned: a change of hash would silently reshuffle every prepared corpus's splits.
  assert [records.split_of(f"pmid:{i}", 0.001) for i in (4, 8)] == ["train", "validation"]
  assert [records.split_of(f"pmid:{i}", 0.5) for i in (1, 5)] == ["validation", "train"]
  ids = [f"pmid:{i}" for i in range(20_000)]
  assert {records.split_of(i, 0.0) for i in ids} == {"train"}
  validation = sum(records.split_of(i, 0.1) == "validation" for i in ids)
  assert 1_800 < validation < 2_200


# prepare(): shards, stats, logs.

def test_prepare_mimic_iii_counts_shards_and_keeps_text_out_of_logs(tmp_path, absl_logs, capfd):
  out = tmp_path / "mimic3"
  stats = records.prepare("mimic_iii_notes", [MIMIC_III], str(out), num_shards=2,
                          validation_fraction=0)
  assert stats == {
      "format": "mimic_iii_notes",
      "inputs": [MIMIC_III],
      "options": {},
      "num_shards": 2,
      "validation_fraction": 0,
      "min_chars": 32,
      "max_errors": None,
      "records_read": 4,
      "records_written": {"train": 2},
      "errors": {"wrong_field_count": 1},
      "skipped": {"iserror": 1},
      "too_short": 1,
      "duplicates": 1,
      "shards": {"train": {"train.tfrecord-00000-of-00002": 1, "train.tfrecord-00001-of-00002": 1}},
      "file_pattern": {"train": "train.tfrecord-?????-of-00002"},
  }
  assert json.loads((out / "stats.json").read_text()) == stats
  assert sorted(os.listdir(out)) == [
      "stats.json", "train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"]
  assert records.split_file_patterns(str(out)) == {"train": str(out / "train.tfrecord-?????-of-00002")}
  assert list(records.read_records(records.split_file_patterns(str(out))["train"])) == [
      {"id": "mimic3:9001", "text": records.clean_text(MIMIC_III_9001)},
      {"id": "mimic3:9004", "text": "Invented progress note: imaginary vitals stable, no new findings."},
  ]
  assert records.clean_text(MIMIC_III_9001) == (
      "Admission Date: [**2101-1-1**] Discharge Date: [**2101-1-5**]\n\nService: MEDICINE\n\n"
      "History of Present Illness:\nInvented patient with a made-up \"fictional\" fever.\n\n"
      "Discharge Condition: synthetic and stable.")

  logged = absl_logs.text + "".join(capfd.readouterr())
  assert f"skipped {MIMIC_III} at row 2 (line 13): iserror" in logged
  assert f"skipped {MIMIC_III} at mimic3:9006: too_short" in logged
  for words in CLINICAL_WORDS:
    assert words not in logged
    assert words not in json.dumps(stats)


def test_prepare_logs_no_text_of_malformed_records(tmp_path, absl_logs, capfd):
  for fmt, path in [("pubmed_xml", PUBMED), ("jsonl", JSONL), ("mimic_iv_notes", MIMIC_IV),
                    ("pmc_nxml", str(FIXTURES / "pmc_nxml"))]:
    stats = records.prepare(fmt, [path], str(tmp_path / fmt), num_shards=1)
    logged = absl_logs.text + "".join(capfd.readouterr()) + json.dumps(stats)
    assert stats["errors"] and "SECRET" not in logged, fmt
  assert stats["errors"] == {"bad_xml": 1}


def test_short_documents_are_counted_apart_and_help_says_so(tmp_path):
  source = tmp_path / "short.jsonl"
  texts = ["Aspirin.", "An invented abstract long enough to pass the minimum length.", "Ok"]
  source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "{broken\n")
  stats = records.prepare("jsonl", [str(source)], str(tmp_path / "a"), num_shards=1,
                          validation_fraction=0)
  assert (stats["too_short"], stats["errors"], stats["skipped"]) == (2, {"bad_json": 1}, {})
  assert stats["records_written"] == {"train": 1}
  stats = records.prepare("jsonl", [str(source)], str(tmp_path / "b"), num_shards=1,
                          validation_fraction=0, min_chars=0)
  assert (stats["too_short"], stats["records_written"]) == (0, {"train": 3})
  help_text = " ".join(load_cli().build_parser().format_help().split())
  assert "--min_chars MIN_CHARS cleaned texts shorter than this are dropped, valid short documents " \
         "too; stats.json counts them as too_short (0 keeps every text)" in help_text


def test_bad_records_and_unreadable_inputs_are_passed_over_up_to_max_errors(tmp_path, capsys):
  source = tmp_path / "docs.jsonl"
  lines = [json.dumps({"text": f"Invented document number {i:03d}, long enough."}) for i in range(9)]
  source.write_text("\n".join(lines[:4] + ["{broken"] + lines[4:]) + "\n")
  (tmp_path / "folder.jsonl").mkdir()
  inputs = [str(tmp_path / "*.jsonl")]
  stats = records.prepare("jsonl", inputs, str(tmp_path / "a"), num_shards=1, validation_fraction=0)
  assert (stats["errors"], stats["records_written"]) == ({"bad_json": 1, "unreadable_file": 1},
                                                         {"train": 9})
  stats = records.prepare("jsonl", inputs, str(tmp_path / "b"), num_shards=1, validation_fraction=0,
                          max_errors=0.2)
  assert stats["max_errors"] == 0.2
  for max_errors, match in [(1, r"2 of 11 records \(18\.18%\) > max_errors 1 \(bad_json 1, "
                                r"unreadable_file 1; first: \S+docs\.jsonl at line 5\)"),
                            (0.1, r"2 of 11 records \(18\.18%\) > max_errors 0\.1 ")]:
    out = tmp_path / f"limit{max_errors}"
    with pytest.raises(corpora.CorpusError, match=f"too many errors, nothing written: {match}"):
      records.prepare("jsonl", inputs, str(out), num_shards=1, max_errors=max_errors)
    assert os.listdir(out) == []
  with pytest.raises(ValueError, match="max_errors must be a whole count"):
    records.prepare("jsonl", inputs, str(tmp_path / "c"), max_errors=1.5)
  cli = load_cli()
  assert cli.main(["--format", "jsonl", "--input", inputs[0], "--out", str(tmp_path / "d"),
                   "--max_errors", "0.01"]) == 1
  last = capsys.readouterr().err.splitlines()[-1]
  assert last.startswith("prepare_corpus: error: ") and "nothing written: 2 of 11 records" in last


def test_prepare_round_robin_split_and_rerun(tmp_path):
  source = tmp_path / "docs.jsonl"
  source.write_text("".join(json.dumps({"text": f"Invented document number {i:03d} for sharding."}) + "\n"
                            for i in range(200)))
  first = records.prepare("jsonl", [str(source)], str(tmp_path / "a"), num_shards=3,
                          validation_fraction=0.25)
  second = records.prepare("jsonl", [str(tmp_path / "*.jsonl")], str(tmp_path / "b"), num_shards=3,
                           validation_fraction=0.25)
  assert first == second
  expected = {split: [f"docs.jsonl:{i + 1}" for i in range(200)
                      if records.split_of(f"docs.jsonl:{i + 1}", 0.25) == split]
              for split in ("train", "validation")}
  assert 30 < len(expected["validation"]) < 70
  for split, ids in expected.items():
    counts = list(first["shards"][split].values())
    assert counts == [len(ids[s::3]) for s in range(3)]
    assert first["records_written"][split] == sum(counts) == len(ids)
    for run in ("a", "b"):
      got = list(records.read_records(str(tmp_path / run / first["file_pattern"][split])))
      assert [r["id"] for r in got] == ids[0::3] + ids[1::3] + ids[2::3]


def test_failed_run_leaves_no_output_files(tmp_path, monkeypatch):
  out = tmp_path / "out"
  during = {}

  def failing_reader(path):
    for i in range(3):
      yield Document(f"doc:{i}", f"An invented document long enough to keep, number {i}.")
    during["files"] = sorted(os.listdir(out))
    raise RuntimeError("simulated crash in the middle of a run")

  monkeypatch.setitem(corpora.READERS, "jsonl", failing_reader)
  with pytest.raises(RuntimeError, match="simulated crash"):
    records.prepare("jsonl", [JSONL], str(out), num_shards=2)
  assert during["files"] == [f".{split}.tfrecord-0000{i}-of-00002.incomplete"
                             for split in ("train", "validation") for i in range(2)]
  assert os.listdir(out) == []


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.md").write_text("kept")
  with pytest.raises(FileExistsError, match="not empty"):
    records.prepare("pubmed_xml", [PUBMED], str(out))
  assert os.listdir(out) == ["notes.md"]
  records.prepare("pubmed_xml", [PUBMED], str(out), num_shards=3, overwrite=True)
  (out / ".train.tfrecord-00000-of-00003.incomplete").write_bytes(b"left by a killed run")
  stats = records.prepare("pubmed_xml", [PUBMED], str(out), num_shards=1, validation_fraction=0,
                          overwrite=True)
  assert sorted(os.listdir(out)) == ["notes.md", "stats.json", "train.tfrecord-00000-of-00001"]
  assert stats["records_written"] == {"train": 2}


def test_prepare_checks_arguments_before_writing(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match="no input matches"):
    records.prepare("jsonl", [str(tmp_path / "missing-*.jsonl")], str(out))
  with pytest.raises(ValueError, match="does not take mimic_category"):
    records.prepare("jsonl", [JSONL], str(out), mimic_category="Radiology")
  with pytest.raises(ValueError, match="num_shards"):
    records.prepare("jsonl", [JSONL], str(out), num_shards=0)
  assert not out.exists()


# The command line.

def test_cli_end_to_end(tmp_path):
  out = tmp_path / "pubmed_abstracts"
  result = subprocess.run(
      [sys.executable, "scripts/prepare_corpus.py", "--format", "pubmed_xml",
       "--input", str(FIXTURES / "pubmed" / "pubmed99n*.xml.gz"), "--out", str(out),
       "--num_shards", "2", "--validation_fraction", "0"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == {
      "format": "pubmed_xml",
      "inputs": [PUBMED],
      "options": {},
      "num_shards": 2,
      "validation_fraction": 0.0,
      "min_chars": 32,
      "max_errors": None,
      "records_read": 2,
      "records_written": {"train": 2},
      "errors": {"no_abstract": 1, "no_pmid": 1},
      "skipped": {},
      "too_short": 0,
      "duplicates": 0,
      "shards": {"train": {"train.tfrecord-00000-of-00002": 1, "train.tfrecord-00001-of-00002": 1}},
      "file_pattern": {"train": "train.tfrecord-?????-of-00002"},
  }
  assert "SECRET" not in result.stdout + result.stderr
  assert [r["id"] for r in records.read_records(str(out / "train.tfrecord-*"))] == [
      "pmid:90000001", "pmid:90000002"]


def test_cli_expected_errors_exit_1_without_traceback(tmp_path, capsys):
  cli = load_cli()
  missing = str(tmp_path / "nothing-*.xml.gz")
  assert cli.main(["--format", "pubmed_xml", "--input", missing, "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"prepare_corpus: error: no input matches {missing!r} (traceback: ")
  assert len(err.splitlines()) == 1
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  assert cli.main(["--format", "pubmed_xml", "--input", PUBMED, "--out", str(tmp_path / "full")]) == 1
  assert "not empty; choose another folder or pass --overwrite" in capsys.readouterr().err
