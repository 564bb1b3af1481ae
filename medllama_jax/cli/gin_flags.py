"""Gin on the command line, as t5x users know it: ``--gin_file``, ``--gin_bindings``, ``--gin.NAME=VALUE``.

``--gin.NAME=VALUE`` is the binding ``NAME = VALUE``, so string values need their inner quotes
(``--gin.RUN_DIR="'runs/13b'"``); a value that is not a gin value is a usage error that says so.
Gin files are looked up as given, then in the current directory, the project's ``gin/`` folder
(``include 'models/llama2_13b.gin'``) and the project's root (``--gin_file=gin/demo/...``), so the
project's recipes are found from any directory.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

import gin

from medllama_jax.cli import console

PROJECT_GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"


def gin_parser(prog: str, description: str | None, example_binding: str,
               gin_file_required: bool = True) -> console.ArgumentParser:
  """The argument parser of an entry point configured by gin files (``--gin.NAME=VALUE`` is taken
  apart before, by :func:`split_gin_flags`)."""
  parser = console.make_parser(prog, description)
  parser.add_argument("--gin_file", action="append", default=[], required=gin_file_required,
                      help="gin file (repeatable; later files override earlier ones)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help=f"gin binding(s), e.g. '{example_binding}' (repeatable)")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="extra folder where gin files and includes are looked up")
  return parser


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--gin.NAME=VALUE`` arguments (returned as bindings) from the other arguments.

  Raises ValueError for a malformed one, or a value gin cannot read (with how to quote strings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise ValueError(f"{arg!r}: expected --gin.NAME=VALUE")
      _check_value(name, value)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def _check_value(name: str, value: str) -> None:
  """A string without its inner quotes is the common mistake; references (``@``, ``%``) are
  checked when the configurables they name are registered."""
  if value.strip().startswith(("@", "%")):
    return
  try:
    gin.config.parse_value(value)
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"--gin.{name}={value}: not a gin value; a string needs inner quotes: "
                     f"--gin.{name}=\"'{value}'\"") from e


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                  ) -> tuple[argparse.Namespace, list[str]]:
  """``argv`` (default: the command line) parsed by a :func:`gin_parser`, and its
  ``--gin.NAME=VALUE`` flags as bindings; a malformed one is a usage error (exit status 2)."""
  try:
    rest, gin_flags = split_gin_flags(list(sys.argv[1:] if argv is None else argv))
  except ValueError as e:
    parser.error(str(e))
  return parser.parse_args(rest), gin_flags


def gin_search_paths(extra: Sequence[str]) -> list[str]:
  """Where gin files and their includes are looked up (module docstring), after ``extra``."""
  return [*extra, os.getcwd(), str(PROJECT_GIN_DIR), str(PROJECT_GIN_DIR.parent)]


def add_gin_search_paths(search_paths: Sequence[str]) -> None:
  for path in gin_search_paths(search_paths):
    gin.add_config_file_search_path(path)


def _check_files_exist(files: Sequence[str], search_paths: Sequence[str]) -> None:
  """A missing gin file is a usage error naming where it was looked for (gin's own error lists
  every reader it tried)."""
  folders = gin_search_paths(search_paths)
  for path in files:
    if "://" in path or any(os.path.isfile(os.path.join(folder, path)) for folder in folders):
      continue
    raise console.UsageError(f"gin file {path!r} not found (looked in {', '.join(folders)})")


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str],
              finalize: bool = True) -> None:
  """Parses gin files and bindings; a missing file or a bad binding is a usage error.
  ``finalize=False`` leaves unset macros allowed (a plan reads no data)."""
  _check_files_exist(files, search_paths)
  add_gin_search_paths(search_paths)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=finalize)
  except (SyntaxError, ValueError, KeyError) as e:
    raise console.UsageError(f"gin: {console.one_line(e)}") from e


def apply_gin(args: argparse.Namespace, gin_flags: Sequence[str]) -> None:
  """Parses the gin files and bindings of a command parsed by :func:`parse_command`."""
  parse_gin(args.gin_file, [*args.gin_bindings, *gin_flags], args.gin_search_path)
