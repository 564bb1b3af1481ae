"""A MIBE dataset's raw release → the folder medllama-eval reads (DATA_DIR/DATASET).

  python scripts/prepare_mibe.py ddi --raw DDICorpus/Train \\
      --test_raw "DDICorpus/Test/Test for DDI Extraction task" --out mibe/ddi
  python scripts/prepare_mibe.py mtsample --raw mtsamples.csv --out mibe/mtsample \\
      [--seed 0] [--test_fraction 0.2] [--max_errors 0.01] [--overwrite]
  python scripts/prepare_mibe.py pubmedqa --release_parquet PubmedQA_test.parquet \\
      --out mibe_release/pubmedqa

Datasets and what --raw is: see medllama_jax/eval/raw/ (one module per release format). Without
--test_raw the records of --raw are split by a seeded draw. --release_parquet makes the release's
own test set (its parquet file, read by medllama_jax/eval/raw/release.py) the evaluation set, its
queries the prompts; a --raw given with it is all few-shot pool. A damaged item (a row, note,
pair, report...) is logged with its file and place, left out and counted as malformed_* in the
summary; --max_errors (a count, or a fraction of the items read; default: no limit) makes too many of
them fail the run, writing nothing. Prints the summary (also written to prepare_summary.json in
--out); exit status 1 with a one-line message naming the file, place and field on input that cannot
be used at all, a missing input, files already in --out or more damaged items than --max_errors
allows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from medllama_jax.cli import console
from medllama_jax.data import error_limit
from medllama_jax.eval import raw
from medllama_jax.eval.raw import release


def build_parser() -> argparse.ArgumentParser:
  parser = console.make_parser("prepare_mibe", __doc__)
  parser.add_argument("dataset", choices=sorted({*raw.CONVERTERS, *release.KINDS}))
  parser.add_argument("--raw",
                      help="the release: " + "; ".join(f"{name}: {c.raw}"
                                                      for name, c in raw.CONVERTERS.items()))
  parser.add_argument("--test_raw", help="the release's own test portion, in the same format")
  parser.add_argument("--release_parquet",
                      help=f"{release.DESCRIPTION}: the evaluation set, instead of --test_raw "
                           f"(datasets: {', '.join(release.KINDS)})")
  parser.add_argument("--out", required=True, help="the dataset's folder, DATA_DIR/DATASET")
  parser.add_argument("--seed", type=int, default=0, help="seed of the test/pool draw")
  parser.add_argument("--test_fraction", type=float, default=raw.DEFAULT_TEST_FRACTION,
                      help="share of units drawn for the evaluation set (without --test_raw)")
  error_limit.add_flag(parser, "items")
  parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
  return parser


def _prepare(args: argparse.Namespace) -> int:
  summary = raw.prepare(args.dataset, args.raw, args.out, test_raw=args.test_raw,
                        release_parquet=args.release_parquet, seed=args.seed,
                        test_fraction=args.test_fraction, overwrite=args.overwrite,
                        max_errors=args.max_errors)
  print(json.dumps(summary, indent=2))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  return console.run(parser.prog, args, lambda: _prepare(args))


if __name__ == "__main__":
  sys.exit(main())
