"""``medllama-train``: run ``loop.train`` from gin files and bindings, as t5x users know it.

  medllama-train --gin_file=gin/pretrain_me_llama_13b.gin \\
      --gin.RUN_DIR="'gs://bucket/runs/me-llama-13b'" --gin.train.total_steps=1000 \\
      [--gin_bindings='train.save_every = 500'] [--gin_search_path=DIR] [--debug]

Every host of a pod runs the same command. ``--gin.NAME=VALUE`` is a binding ``NAME = VALUE``: string
values need their inner quotes. Gin files are looked up as given, then in the project's ``gin/``
folder and its root (so ``include 'models/llama2_13b.gin'`` and ``--gin_file=gin/...`` work from any
directory). ``train.run_dir`` is required (the recipes bind it to the macro ``RUN_DIR``). The
console shows each stage and the training progress (step, loss, tokens/s, ETA); everything else is
in the log file it names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from medllama_jax.cli import console, gin_flags


def build_parser() -> console.ArgumentParser:
  return gin_flags.gin_parser("medllama-train", __doc__, "train.total_steps = 100")


def _train(args, gin_flags_: Sequence[str]) -> int:
  import seqio_tasks.pretrain  # noqa: F401  (registers the pre-training configurables with gin)
  from medllama_jax import partitioning
  from medllama_jax.train import loop

  partitioning.initialize_distributed()
  gin_flags.apply_gin(args, gin_flags_)
  result = loop.train()
  if result.stopped_by_signal:
    print(f"stopped at step {result.step} by a termination signal, after saving it: rerun the "
          "same command to resume")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, bindings = gin_flags.parse_command(parser, argv)
  return console.run(parser.prog, args, lambda: _train(args, bindings), show_log_path=True)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
