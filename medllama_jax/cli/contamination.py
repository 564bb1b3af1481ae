"""``medllama-contamination``: n-gram overlap of the MIBE evaluation sets with the training data.

  medllama-contamination --data_dir mibe --out reports/contamination [--tasks all|pubmedqa,medqa]
      [--prepared data/pubmed_abstracts ...] [--instruct instruct_data ...]
      [--raw jsonl:'redpajama/*.jsonl.gz' ...] [--n 13] [--top_documents 10]
      [--write_decontaminated data_clean [--overwrite]] [--runner DirectRunner [beam options]]

Sources (each repeatable, at least one): ``--prepared`` a prepared pre-training corpus folder,
``--instruct`` an instruction file or a folder of them (the instruction mixture's data_dir; one
source per file), ``--raw`` FORMAT:PATH raw files in a prepare_corpus format (path or glob).
``--tasks`` picks datasets as medllama-eval's does (``all`` = the 12 MIBE datasets; ``mmlu`` by
name). Writes ``contamination.json`` and ``contamination.md`` into ``--out`` (ids and counts, no
text) and prints the Markdown. ``--write_decontaminated OUT`` also writes, for every ``--prepared``
corpus, a copy without the documents that share an n-gram with a test example, as ``OUT/{corpus
folder name}``: a ``data_dir`` for the pre-training mixture. Exit status 1 with a one-line message
for a missing input, a non-empty output folder or bad data. Normalisation and hashing:
``medllama_jax/contamination/ngrams.py``; which test text is checked:
``medllama_jax/contamination/eval_sets.py``. ``--runner`` runs the scan as an Apache Beam pipeline
(``medllama_jax/contamination/beam_scan.py``; arguments this tool does not know go to Beam as
pipeline options) with the same report and copies as the single-process scan.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from absl import logging

from medllama_jax.cli import console
from medllama_jax.data import beam_options, corpora
from medllama_jax.eval import datasets as mibe_datasets

if TYPE_CHECKING:
  from medllama_jax.contamination import sources
  from medllama_jax.contamination.decontaminate import DecontaminatedCopy
  from medllama_jax.contamination.eval_sets import EvalSetIndex
  from medllama_jax.contamination.scan import SourceTally, TopDocuments

  # Per-source tallies, the best matching documents, rejected records per source, each copy's
  # stats.json: what a scan, in this process or on Beam, gives the report.
  ScanOutcome = tuple[dict[str, SourceTally], TopDocuments, dict[str, Mapping[str, int]],
                      dict[str, dict]]

DEFAULT_N = 13
NORMALISATION = "NFKC, casefold, words = runs of letters/digits"


def build_parser() -> console.ArgumentParser:
  parser = console.make_parser("medllama-contamination", __doc__)
  parser.add_argument("--data_dir", required=True, help="folder with one sub-folder per dataset")
  parser.add_argument("--tasks", default="all",
                      help="comma-separated datasets; 'all' = the 12 MIBE datasets")
  parser.add_argument("--out", required=True,
                      help="folder for contamination.json and contamination.md")
  parser.add_argument("--prepared", action="append", default=[],
                      help="prepared corpus folder (prepare_corpus.py output); repeatable")
  parser.add_argument("--instruct", action="append", default=[],
                      help="instruction file (.jsonl/.json/.parquet) or folder; repeatable")
  parser.add_argument("--raw", action="append", default=[],
                      help=f"FORMAT:PATH, FORMAT one of {', '.join(corpora.READERS)}; repeatable")
  parser.add_argument("--n", type=int, default=DEFAULT_N, help="words per n-gram")
  parser.add_argument("--top_documents", type=int, default=10,
                      help="best-matching corpus documents listed per dataset")
  parser.add_argument("--batch_words", type=int, default=1 << 18,
                      help="corpus words hashed and looked up together")
  parser.add_argument("--write_decontaminated", metavar="OUT",
                      help="write each --prepared corpus, less its overlapping documents, to "
                           "OUT/{its folder name}")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace what an earlier run wrote in the decontaminated folders")
  beam_options.add_runner_flag(parser)
  return parser


def _datasets(tasks: str) -> list[str]:
  names = [name for item in tasks.split(",")
           for name in (mibe_datasets.MIBE_DATASETS if item == "all" else (item,))]
  unknown = sorted(set(names) - set(mibe_datasets.SPECS))
  if unknown:
    raise console.UsageError(f"--tasks: unknown datasets {', '.join(unknown)}; known: all, "
                             f"{', '.join(sorted(mibe_datasets.SPECS))}")
  return list(dict.fromkeys(names))


def _copies(prepared: Sequence[sources.PreparedCorpus], out: str,
            overwrite: bool) -> dict[str, DecontaminatedCopy]:
  from medllama_jax.contamination.decontaminate import DecontaminatedCopy  # noqa: F811

  folders = [os.path.basename(os.path.normpath(corpus.path)) for corpus in prepared]
  if len(set(folders)) < len(folders):
    raise ValueError(f"--write_decontaminated: --prepared folders {folders} share a name; each "
                     f"copy is written to {out}/<folder name>")
  return {corpus.name: DecontaminatedCopy(corpus, os.path.join(out, folder), overwrite)
          for corpus, folder in zip(prepared, folders)}


def contamination(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> dict:
  """Checks every source against the evaluation sets; returns the report written to ``--out``.

  With ``args.runner`` the scan runs on Beam, ``beam_args`` its pipeline options."""
  from medllama_jax.contamination import eval_sets, report, sources

  datasets = _datasets(args.tasks)
  prepared = [sources.PreparedCorpus(path) for path in args.prepared]
  corpus_sources: list[sources.CorpusSource] = [
      *prepared, *(f for path in args.instruct for f in sources.instruction_files(path)),
      *(sources.RawCorpus(spec) for spec in args.raw)]
  names = [source.name for source in corpus_sources]
  if len(set(names)) < len(names):
    raise ValueError(f"a corpus source is given twice: {names}")
  if args.write_decontaminated and not prepared:
    raise ValueError("--write_decontaminated copies --prepared corpora; none given")
  index = eval_sets.load_index(args.data_dir, datasets, args.n)
  copies = (_copies(prepared, args.write_decontaminated, args.overwrite)
            if args.write_decontaminated else {})
  provenance = {"n": args.n, "data_dir": args.data_dir, "datasets": datasets}
  if args.runner:
    outcome = _scan_on_beam(args, beam_args, corpus_sources, index, copies, provenance)
  else:
    outcome = _scan_in_process(args, corpus_sources, index, copies, provenance)
  tallies, top, rejected, copy_stats = outcome
  result = report.build_report(index, tallies, top, rejected,
                               {"data_dir": args.data_dir, "normalisation": NORMALISATION})
  if copy_stats:
    result["decontaminated"] = {
        name: {"out_dir": copies[name].out_dir, "removed": stats["decontamination"]["removed"],
               "records_written": stats["records_written"]}
        for name, stats in copy_stats.items()}
  return result


def _scan_in_process(args: argparse.Namespace, corpus_sources: Sequence[sources.CorpusSource],
                     index: EvalSetIndex, copies: Mapping[str, DecontaminatedCopy],
                     provenance: Mapping[str, Any]) -> ScanOutcome:
  """One pass over the sources in the order given, each copy written as its corpus is read."""
  from medllama_jax.contamination.scan import Scanner

  scanner = Scanner(index, args.top_documents, args.batch_words)
  copy_stats = {}
  for source in corpus_sources:
    scanned = scanner.scan(source.name, source.kind, source.documents())
    if source.name in copies:
      copy_stats[source.name] = copies[source.name].write(scanned, provenance)
    else:
      for _ in scanned:
        pass
  return (scanner.tallies, scanner.top,
          {source.name: source.rejections.counts for source in corpus_sources}, copy_stats)


def _scan_on_beam(args: argparse.Namespace, beam_args: Sequence[str],
                  corpus_sources: Sequence[sources.CorpusSource], index: EvalSetIndex,
                  copies: Mapping[str, DecontaminatedCopy], provenance: Mapping[str, Any]
                  ) -> ScanOutcome:
  """The same as :func:`_scan_in_process`, each file of each source read on a Beam worker."""
  options = beam_options.pipeline_options(args.runner, beam_args)
  from medllama_jax.contamination import beam_scan

  scanned, copy_stats = beam_scan.run_scan(corpus_sources, index, args.top_documents,
                                           args.batch_words, copies, provenance, options)
  return scanned.tallies, scanned.top, scanned.rejected, copy_stats


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, beam_args = beam_options.parse_args(parser, argv)
  if not (args.prepared or args.instruct or args.raw):
    parser.error("give at least one corpus source: --prepared, --instruct or --raw")
  return console.run(parser.prog, args, lambda: _scan_and_report(args, beam_args))


def _scan_and_report(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
  from medllama_jax.contamination import report

  result = contamination(args, beam_args)
  json_path, markdown_path = report.write_report(args.out, result)
  for dataset, entry in result["datasets"].items():
    logging.info("%s: %d of %d examples contaminated", dataset, entry["contaminated_examples"],
                 entry["examples"])
  logging.info("report: %s, %s", json_path, markdown_path)
  print(report.markdown(result), end="")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
