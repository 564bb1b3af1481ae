"""``medllama-train``: run ``loop.train`` from gin files and bindings, as t5x users know it.

  medllama-train --gin_file=gin/pretrain_me_llama_13b.gin \\
      --gin.RUN_DIR=\\"gs://bucket/runs/me-llama-13b\\" --gin.train.total_steps=1000 \\
      [--gin_bindings='train.save_every = 500'] [--gin_search_path=DIR]

Every host of a pod runs the same command. ``--gin.NAME=VALUE`` is a binding ``NAME = VALUE``: string
values need their inner quotes. Gin files are looked up as given, then in the project's ``gin/``
folder and its root (so ``include 'models/llama2_13b.gin'`` and ``--gin_file=gin/...`` work from any
directory). ``train.run_dir`` is
required (the recipes bind it to the macro ``RUN_DIR``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

import gin
from absl import logging

import seqio_tasks.pretrain  # noqa: F401  (registers the pre-training configurables with gin)
from medllama_jax import logs, partitioning
from medllama_jax.train import loop

PROJECT_GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--gin.NAME=VALUE`` arguments (returned as bindings) from the other arguments."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise ValueError(f"{arg!r}: expected --gin.NAME=VALUE")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def gin_parser(prog: str, description: str | None, example_binding: str,
               gin_file_required: bool = True) -> argparse.ArgumentParser:
  """The argument parser of an entry point configured by gin files: ``--gin_file``,
  ``--gin_bindings`` and ``--gin_search_path`` (``--gin.NAME=VALUE`` is taken apart before, by
  :func:`split_gin_flags`)."""
  parser = argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], required=gin_file_required,
                      help="gin file (repeatable; later files override earlier ones)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help=f"gin binding(s), e.g. '{example_binding}' (repeatable)")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="extra folder where gin files and includes are looked up")
  return parser


def build_parser() -> argparse.ArgumentParser:
  return gin_parser("medllama-train", __doc__, "train.total_steps = 100")


def add_gin_search_paths(search_paths: Sequence[str]) -> None:
  """Where gin files and their includes are looked up: the folders given, the current directory,
  the project's ``gin/`` folder (``include 'models/llama2_13b.gin'``) and the project's root
  (``--gin_file=gin/demo/pretrain_demo.gin``), so the project's recipes are found from any directory."""
  for path in [*search_paths, os.getcwd(), str(PROJECT_GIN_DIR), str(PROJECT_GIN_DIR.parent)]:
    gin.add_config_file_search_path(path)


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
  add_gin_search_paths(search_paths)
  gin.parse_config_files_and_bindings(list(files), list(bindings))


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                  ) -> tuple[argparse.Namespace, list[str]]:
  """``argv`` (default: the command line) parsed by a :func:`gin_parser`, and its
  ``--gin.NAME=VALUE`` flags as bindings; a malformed one is a usage error (exit status 2)."""
  try:
    rest, gin_flags = split_gin_flags(list(sys.argv[1:] if argv is None else argv))
  except ValueError as e:
    parser.error(str(e))
  return parser.parse_args(rest), gin_flags


def apply_gin(args: argparse.Namespace, gin_flags: Sequence[str]) -> None:
  """Parses the gin files and bindings of a command parsed by :func:`parse_command`."""
  parse_gin(args.gin_file, [*args.gin_bindings, *gin_flags], args.gin_search_path)


def main(argv: Sequence[str] | None = None) -> int:
  args, gin_flags = parse_command(build_parser(), argv)
  logs.setup()
  partitioning.initialize_distributed()
  apply_gin(args, gin_flags)
  result = loop.train()
  logging.info("finished at step %d%s", result.step,
               " (termination signal: resume with the same command)" if result.stopped_by_signal
               else "")
  if result.final_model_dir:
    print(f"final model folder: {result.final_model_dir}")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
