"""Raw corpus files → sharded TFRecords plus stats.json, for the pre-training seqio Tasks.

  python scripts/prepare_corpus.py --format pubmed_xml --input 'raw/pubmed25n*.xml.gz' \\
      --out data/pubmed_abstracts [--num_shards 64] [--validation_fraction 0.001] [--min_chars 32] \\
      [--max_errors 0.01] [--overwrite] [--pile_set_name "PubMed Abstracts"] \\
      [--mimic_category "Discharge summary"] [--vocabulary MODEL_DIR] \\
      [--near_duplicates 0.8 [--shingle_words 5] [--minhash_permutations 128]] \\
      [--runner DirectRunner|DataflowRunner|... [Beam pipeline options]]

--input repeats and takes glob patterns (gs:// too). Prints the summary (stats.json) as JSON; exit
status 1 with a one-line message on a missing input, a non-empty output folder, a bad option or more
damaged records than --max_errors allows. With --vocabulary the written documents' tokens are counted
(token_stats.json, as scripts/count_tokens.py writes it, and per split in stats.json).
--near_duplicates also removes documents whose word shingles reach that Jaccard similarity with an
earlier document's (MinHash LSH; medllama_jax/data/near_duplicates.py). With --runner
the same work runs as an Apache Beam pipeline on that runner, with the same output; every other
unknown argument goes to Beam (--project, --region, --temp_location, --direct_num_workers, ...). See
medllama_jax/data/records.py for the output format, medllama_jax/data/beam_prepare.py for the
pipeline and medllama_jax/data/corpora.py for the readers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from medllama_jax.cli import console
from medllama_jax.data import beam_options, corpora, error_limit


def build_parser() -> argparse.ArgumentParser:
  parser = console.make_parser("prepare_corpus", __doc__)
  parser.add_argument("--format", required=True, choices=sorted(corpora.READERS))
  parser.add_argument("--input", action="append", required=True, help="path or glob; repeatable")
  parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
  parser.add_argument("--num_shards", type=int, default=8, help="files per split")
  parser.add_argument("--validation_fraction", type=float, default=0.001, help="0 = no validation")
  parser.add_argument("--min_chars", type=int, default=32,
                      help="cleaned texts shorter than this are dropped, valid short documents too; "
                           "stats.json counts them as too_short (0 keeps every text)")
  error_limit.add_flag(parser, "records")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace what an earlier run wrote in --out")
  parser.add_argument("--pile_set_name", action="append",
                      help="jsonl: keep only this meta.pile_set_name; repeatable")
  parser.add_argument("--mimic_category", action="append",
                      help="MIMIC notes: keep only this CATEGORY (III) / note_type (IV); repeatable")
  parser.add_argument("--vocabulary", metavar="MODEL_DIR",
                      help="count the written documents' tokens with this model folder's (or "
                           "tokenizer file's) tokenizer")
  parser.add_argument("--near_duplicates", type=float, metavar="THRESHOLD",
                      help="also remove near duplicates: documents whose word shingles reach this "
                           "Jaccard similarity with an earlier document's (e.g. 0.8; default: off)")
  parser.add_argument("--shingle_words", type=int, default=5, help="words per shingle")
  parser.add_argument("--minhash_permutations", type=int, default=128,
                      help="MinHash signature length")
  beam_options.add_runner_flag(parser)
  return parser


def _prepare(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
  from medllama_jax.data import records
  from medllama_jax.data.near_duplicates import NearDuplicateSettings
  from medllama_jax.data.vocab import model_vocabulary

  options = {name: getattr(args, name) for name in ("pile_set_name", "mimic_category")
             if getattr(args, name) is not None}
  settings = dict(num_shards=args.num_shards, validation_fraction=args.validation_fraction,
                  min_chars=args.min_chars, overwrite=args.overwrite, max_errors=args.max_errors,
                  vocabulary=model_vocabulary(args.vocabulary) if args.vocabulary else None,
                  near_duplicates=None if args.near_duplicates is None else NearDuplicateSettings(
                      args.near_duplicates, args.shingle_words, args.minhash_permutations))
  if args.runner:
    from medllama_jax.data import beam_prepare

    summary = beam_prepare.prepare(
        args.format, args.input, args.out,
        pipeline_options=beam_options.pipeline_options(args.runner, beam_args),
        **settings, **options)
  else:
    summary = records.prepare(args.format, args.input, args.out, **settings, **options)
  print(json.dumps(summary, indent=2))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, beam_args = beam_options.parse_args(parser, argv)
  return console.run(parser.prog, args, lambda: _prepare(args, beam_args))


if __name__ == "__main__":
  sys.exit(main())
