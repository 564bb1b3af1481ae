"""Running a data tool on Apache Beam: the ``--runner`` flag, and the pipeline options it passes through.

A data tool (``scripts/prepare_corpus.py``, ``medllama-contamination``) runs in one process by default.
With ``--runner NAME`` it builds the same work as a Beam pipeline and runs it on that runner:
``DirectRunner`` on this machine, or ``DataflowRunner``, ``FlinkRunner``, ``SparkRunner`` on a cluster.
Every argument the tool does not know is handed to Beam as a pipeline option (``--project``,
``--region``, ``--temp_location``, ``--requirements_file``, ``--direct_num_workers`` ...), as Beam's own
examples take them; without ``--runner`` such an argument is a usage error.

Beam is the ``beam`` extra (``pip install -e ".[beam]"``); it is imported only when a pipeline runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from apache_beam.options.pipeline_options import PipelineOptions


def add_runner_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--runner",
      help="run as an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, "
           "FlinkRunner, SparkRunner, ...); arguments this tool does not know go to Beam as "
           "pipeline options. Default: one process, no Beam")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None
               ) -> tuple[argparse.Namespace, list[str]]:
  """The tool's arguments, and the rest as Beam pipeline options (allowed only with ``--runner``).

  The tool's flags must be spelled out: an abbreviation could take a Beam option for one of them.
  """
  parser.allow_abbrev = False
  args, beam_args = parser.parse_known_args(argv)
  if beam_args and args.runner is None:
    parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need "
                 "--runner)")
  return args, beam_args


def pipeline_options(runner: str, beam_args: Sequence[str] = ()) -> PipelineOptions:
  """Beam's options for ``runner`` plus the passed-through arguments.

  Raises ImportError, with the install command, when the ``beam`` extra is missing.
  """
  try:
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError as e:
    raise ImportError(f"--runner {runner} needs Apache Beam: pip install -e \".[beam]\"") from e
  return PipelineOptions([f"--runner={runner}", *beam_args])
