"""MIBE datasets from their raw releases: one converter per release format, writing exactly the
files ``medllama_jax.eval.datasets.SPECS`` reads (evaluation set and few-shot pool).

Most MIBE data is credentialed or licensed, so the user downloads each release and converts it
once, locally (``scripts/prepare_mibe.py``); nothing here fetches anything. A release with its own
test portion is converted as it stands (``test_raw``); otherwise one input is split by a seeded
draw of whole units (notes, abstracts, documents: see each module), so that the few-shot pool
never holds a piece of a test item.

Malformed input raises :class:`RawFormatError` naming the file, the place and the field, except
where a converter can leave the damaged item out (emrQA's questions, notes and articles; DDI's
pairs, sentences and TSV rows; HoC's TSV rows and abstracts; i2b2's concepts, with their sentences,
and notes; MTSamples' and BioNLI's rows; MIMIC-CXR's reports; the release parquet's rows): it is
then logged with the same details and counted in the summary as ``malformed_<piece>s``
(:meth:`Portion.leave_out`), apart from what a converter leaves out by design and counts under its
own reason (emrQA's ``questions_without_evidence`` and ``notes_without_questions``, DDI's
``discontinuous_pairs``, i2b2's ``notes_without_concepts``, MTSamples'
``rows_without_transcription``, MIMIC-CXR's ``no_findings``, ``no_impression`` and
``not_a_report``). ``max_errors`` (``--max_errors``: a count, or a fraction of the items read, the
records kept plus the pieces left out; default None, no limit) fails a conversion that left out more
malformed pieces than that, before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from absl import logging

from medllama_jax.data import error_limit
from medllama_jax.eval import datasets
from medllama_jax.eval.raw import (bionli, ddi, emrqa, hoc, mimic_cxr, mtsamples, n2c2_concepts,
                                   release)
from medllama_jax.eval.raw.common import (MALFORMED, Portion, RawFormatError, Writer, split_units,
                                          write_csv, write_jsonl, write_squad)

__all__ = ["CONVERTERS", "DEFAULT_TEST_FRACTION", "RawFormatError", "SUMMARY_FILE", "prepare"]

SUMMARY_FILE = "prepare_summary.json"
DEFAULT_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Converter:
  """``read`` turns one raw input (``raw``: what it is) into records; ``write`` writes a split."""
  read: Callable[[str], Portion]
  write: Writer
  raw: str


CONVERTERS: dict[str, Converter] = {
    "i2b2": Converter(n2c2_concepts.read, write_jsonl,
                      "a folder holding the n2c2 2010 .txt notes and their .con files"),
    "ddi": Converter(ddi.read, write_jsonl, "a folder of DDI 2013 corpus .xml files, or BLUE's "
                     "ddi2013-type train.tsv/dev.tsv/test.tsv"),
    "hoc": Converter(hoc.read, write_jsonl, "the Hallmarks-of-Cancer folder (text/, labels/), or "
                     "BLUE's hoc train.tsv/dev.tsv/test.tsv"),
    "emrqa": Converter(emrqa.read, write_squad, "emrQA's generated data.json"),
    "mtsample": Converter(mtsamples.read, write_csv, "Kaggle's mtsamples.csv"),
    "mimic_cxr": Converter(mimic_cxr.read, write_jsonl,
                           "the MIMIC-CXR report tree (files/) or its tar/zip package"),
    "bionli": Converter(bionli.read, write_jsonl, "a BioNLI CSV file"),
}


def _check_out_dir(out_dir: str, names: list[str], overwrite: bool) -> None:
  present = [name for name in names if os.path.exists(os.path.join(out_dir, name))]
  if present and not overwrite:
    raise FileExistsError(f"{out_dir}: {', '.join(present)} already there; pass overwrite "
                          "(--overwrite) to replace")
  os.makedirs(out_dir, exist_ok=True)


def _check_one_evaluation_set(out_dir: str, other: str) -> None:
  """The release's queries and the dataset's own test files may not share a folder: the evaluator
  would not know which to score (``datasets.dataset_files``)."""
  present = sorted(glob.glob(os.path.join(glob.escape(out_dir), other)))
  if present:
    raise FileExistsError(f"{out_dir}: holds another evaluation set ({', '.join(present)}); write "
                          "this one into a folder of its own")


def _write_all(out_dir: str, writers: dict[str, Callable[[Any], None]]) -> None:
  """Writes every file under a hidden temporary name, then renames them into place in order (the
  summary last): a failed run leaves neither a file that looks complete nor new files beside an
  earlier run's."""
  temporaries: dict[str, str] = {}
  try:
    for name, write in writers.items():
      temporaries[name] = os.path.join(out_dir, f".{name}.incomplete")
      with open(temporaries[name], "w", encoding="utf-8", newline="") as f:
        write(f)
  except BaseException:
    for temporary in temporaries.values():
      if os.path.exists(temporary):
        os.remove(temporary)
    raise
  for name, temporary in temporaries.items():
    os.replace(temporary, os.path.join(out_dir, name))


def _check_malformed(dataset: str, skipped: Counter[str], read: int,
                     max_errors: float | None) -> None:
  """Refuses, before anything is written, a conversion that left out more damaged items
  (``malformed_*`` of ``skipped``) of the ``read`` than ``max_errors`` allows (see
  ``error_limit``); what a converter leaves out by design does not count."""
  malformed = {reason: n for reason, n in sorted(skipped.items()) if reason.startswith(MALFORMED)}
  errors = sum(malformed.values())
  if error_limit.exceeded(errors, read, max_errors):
    reasons = ", ".join(f"{reason} {n}" for reason, n in malformed.items())
    raise ValueError(f"{dataset}: too many malformed items, nothing written: "
                     f"{error_limit.describe(errors, read, max_errors, 'items')} ({reasons}); "
                     "each is logged with its file and place")


@dataclasses.dataclass(frozen=True)
class _Source:
  """One input of a conversion: its path, what it should be, its reader, and the writer of the
  records it gives."""
  path: str
  expected: str
  read: Callable[[str], Portion]
  write: Writer


def _sources(dataset: str, raw: str | None, test_raw: str | None,
             release_parquet: str | None) -> dict[str, _Source]:
  """The inputs by the split they give ("train" gives both when there is no "test"), once their
  combination is checked and each is found."""
  if raw is None and release_parquet is None:
    raise ValueError(f"{dataset}: give the raw release (--raw), the release's parquet test file "
                     "(--release_parquet) or both")
  if test_raw and (raw is None or release_parquet):
    raise ValueError(f"{dataset}: test_raw (--test_raw) goes with raw (--raw) alone; "
                     "release_parquet (--release_parquet) is the evaluation set itself")
  sources = {}
  if raw is not None:
    if dataset not in CONVERTERS:
      raise ValueError(f"no converter for {dataset!r}; converters: {', '.join(CONVERTERS)} (the "
                       "other MIBE datasets are read as released: see eval/datasets.py)")
    converter = CONVERTERS[dataset]
    sources["train"] = _Source(raw, converter.raw, converter.read, converter.write)
    if test_raw:
      sources["test"] = _Source(test_raw, converter.raw, converter.read, converter.write)
  if release_parquet is not None:
    release.check_dataset(dataset)
    sources["test"] = _Source(release_parquet, release.DESCRIPTION,
                              functools.partial(release.read, dataset=dataset), write_jsonl)
  for source in sources.values():
    if not os.path.exists(source.path):
      raise FileNotFoundError(f"{source.path}: not found (expected {source.expected})")
  return sources


def prepare(dataset: str, raw: str | None, out_dir: str, *, test_raw: str | None = None,
            release_parquet: str | None = None, seed: int = 0,
            test_fraction: float = DEFAULT_TEST_FRACTION, overwrite: bool = False,
            max_errors: float | None = None) -> dict[str, Any]:
  """Converts ``raw`` (and the release's test portion ``test_raw``, if given) into ``out_dir``.

  Without ``test_raw`` the records of ``raw`` are split, ``test_fraction`` of the units going to
  the evaluation set by a ``seed``-ed draw. With ``release_parquet`` the release's own test set
  (``release.read``) is the evaluation set, written to ``datasets.RELEASE_QUERIES_FILE``, and all of
  ``raw``, if given, the few-shot pool. Damaged items are left out and counted; more of them than
  ``max_errors`` allows (a count, or a fraction of the items read; None: no limit) is a ValueError,
  and then nothing is written. Returns the summary, also written to ``SUMMARY_FILE``.
  """
  error_limit.check(max_errors)
  spec = datasets.get_spec(dataset)
  sources = _sources(dataset, raw, test_raw, release_parquet)
  files = {"test": datasets.RELEASE_QUERIES_FILE if release_parquet else spec.test_files}
  if "train" in sources:
    files["train"] = spec.shot_files
  _check_out_dir(out_dir, [*files.values(), SUMMARY_FILE], overwrite)
  _check_one_evaluation_set(out_dir, spec.test_files if release_parquet
                            else datasets.RELEASE_QUERIES_FILE)
  portions = {name: source.read(source.path) for name, source in sources.items()}
  skipped: Counter[str] = sum((portion.skipped for portion in portions.values()), Counter())
  read = sum(portion.read for portion in portions.values())
  _check_malformed(dataset, skipped, read, max_errors)
  if "test" in portions:
    splits = {name: [record for _, record in portion.units] for name, portion in portions.items()}
  else:
    splits = dict(zip(("test", "train"), split_units(portions["train"].units, seed, test_fraction,
                                                     raw)))
  # Where each split came from: its own input, or the raw release it was drawn from.
  origins = {name: sources[name if name in sources else "train"] for name in splits}
  for name, records in splits.items():
    if not records:
      raise ValueError(f"{dataset}: no {name} records from {origins[name].path}")
  summary = {
      "dataset": dataset,
      "raw": raw,
      "test_raw": test_raw,
      "release_parquet": release_parquet,
      "split": ("release" if test_raw or release_parquet
                else {"seed": seed, "test_fraction": test_fraction}),
      "records": {name: len(records) for name, records in splits.items()},
      "files": files,
      "items_read": read,
      "skipped": dict(sorted(skipped.items())),
      "max_errors": max_errors,
  }
  writers = {file_name: lambda f, records=splits[name], write=origins[name].write: write(f, records)
             for name, file_name in files.items()}
  _write_all(out_dir, {**writers, SUMMARY_FILE: lambda f: json.dump(summary, f, indent=2)})
  logging.info("%s: wrote %s to %s; skipped %s", dataset, summary["records"], out_dir,
               summary["skipped"] or "nothing")
  return summary
