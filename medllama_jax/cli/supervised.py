"""``medllama-supervised``: :func:`medllama_jax.supervised.run_supervised` from gin files and
bindings, as ``medllama-train`` runs ``train``.

  medllama-supervised --gin_file=gin/supervised_me_llama_13b.gin \\
      --gin.OUT_DIR="'runs/supervised/me-llama-13b'" \\
      --gin.BASE_CHECKPOINT="'ckpt/me-llama-13b'" --gin.DATA_DIR="'mibe'" \\
      [--gin.run_supervised.datasets="['pubmedqa']"]

Prints the before/after table at the end (also written to ``OUT_DIR/supervised_results.md``).
Every host of a pod runs the same command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from medllama_jax.cli import console, gin_flags


def build_parser() -> console.ArgumentParser:
  return gin_flags.gin_parser("medllama-supervised", __doc__, "run_supervised.epochs = 1")


def _supervised(args, bindings: Sequence[str]) -> int:
  from medllama_jax import partitioning, supervised

  partitioning.initialize_distributed()
  gin_flags.apply_gin(args, bindings)
  rows = supervised.run_supervised()
  if rows is None:
    print("training stopped by a termination signal: rerun the same command to resume")
    return 0
  print(supervised.comparison_table(rows), end="")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, bindings = gin_flags.parse_command(parser, argv)
  return console.run(parser.prog, args, lambda: _supervised(args, bindings), show_log_path=True)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
