"""Prints each command, then runs it (or, in a dry run, only prints it).

A plan is a list of steps; the commands of one step run at the same time (one ssh per GPU node),
the steps one after another, and the first failing step ends the plan. Commands are argv lists
run without a local shell, so nothing in them is re-interpreted on this machine.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import TextIO

Step = Sequence[Sequence[str]]


class CommandFailed(RuntimeError):
  """A command of the plan exited with a non-zero status."""

  def __init__(self, argv: Sequence[str], returncode: int):
    super().__init__(f"exit status {returncode}: {shlex.join(argv)}")
    self.argv = list(argv)
    self.returncode = returncode


def format_command(argv: Sequence[str]) -> str:
  """The command as one line a POSIX shell would run unchanged."""
  return "$ " + shlex.join(argv)


def run_plan(plan: Sequence[Step], dry_run: bool, out: TextIO | None = None) -> None:
  """Prints every command of ``plan`` to ``out`` (stdout) and, unless ``dry_run``, runs it."""
  out = out or sys.stdout
  for step in plan:
    for argv in step:
      print(format_command(argv), file=out, flush=True)
    if dry_run:
      continue
    processes = [subprocess.Popen(list(argv)) for argv in step]
    returncodes = [p.wait() for p in processes]
    for argv, returncode in zip(step, returncodes):
      if returncode:
        raise CommandFailed(argv, returncode)
