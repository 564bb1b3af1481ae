"""``medllama-supervised``: :func:`medllama_jax.supervised.run_supervised` from gin files and
bindings, as ``medllama-train`` runs ``train``.

  medllama-supervised --gin_file=gin/supervised_me_llama_13b.gin \\
      --gin.OUT_DIR=\\"runs/supervised/me-llama-13b\\" \\
      --gin.BASE_CHECKPOINT=\\"ckpt/me-llama-13b\\" --gin.DATA_DIR=\\"mibe\\" \\
      [--gin.run_supervised.datasets="['pubmedqa']"]

Prints the before/after table at the end (also written to ``OUT_DIR/supervised_results.md``).
Every host of a pod runs the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medllama_jax import logs, partitioning, supervised
from medllama_jax.train import cli as train_cli


def build_parser() -> argparse.ArgumentParser:
  return train_cli.gin_parser("medllama-supervised", __doc__, "run_supervised.epochs = 1")


def main(argv: Sequence[str] | None = None) -> int:
  args, gin_flags = train_cli.parse_command(build_parser(), argv)
  logs.setup()
  partitioning.initialize_distributed()
  train_cli.apply_gin(args, gin_flags)
  rows = supervised.run_supervised()
  if rows is None:
    print("training stopped by a termination signal: rerun the same command to resume")
    return 0
  print(supervised.comparison_table(rows), end="")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
