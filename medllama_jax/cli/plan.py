"""``medllama-plan``: will a training recipe fit a slice, and how fast would it run? No TPU needed.

  medllama-plan --gin_file=gin/pretrain_me_llama_13b.gin --topology v5p-128 \\
      [--topology v4-128] [--mesh data=1,fsdp=-1,tensor=1 --mesh data=1,fsdp=-1,tensor=4] \\
      [--remat full --remat minimal] [--attention splash --attention xla] \\
      [--gin.train.num_microbatches=8] \\
      [--compiler auto|cpu|tpu] [--mfu 0.4] [--hbm_reserve 0.1] [--json plan.json]

The recipe's training step is lowered and compiled for every combination of ``--topology``,
``--mesh``, ``--remat`` and ``--attention`` (gin's when none is given) on abstract shapes:
nothing is allocated, no data or checkpoint is read, and the macros naming them (``RUN_DIR``,
``DATA_DIR``, ``INIT_CHECKPOINT``) may stay unset. Printed: a Markdown table with, per device,
parameters and optimizer state (exact, from shapes and shardings), the compiler's temporaries
(activations, gradients, buffers), the peak against the chip's HBM, and the step time and tokens/s
predicted at ``--mfu``. The table says which compiler produced the numbers (see ``devices.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from absl import logging

from medllama_jax.cli import console, gin_flags
from medllama_jax.config import ATTENTION_IMPLS, REMAT_POLICIES
from medllama_jax.plan import devices
from medllama_jax.plan.topology import Target, parse_target

if TYPE_CHECKING:
  from medllama_jax.plan import planner


def build_parser() -> console.ArgumentParser:
  parser = gin_flags.gin_parser("medllama-plan", __doc__, "train.num_microbatches = 8")
  parser.add_argument("--topology", action="append", required=True,
                      help="target: a TPU slice (v5p-256, v4-128, v5litepod-16, v6e-64, v5p:4x4x12) "
                           "or GPUs (8xH100); repeatable")
  parser.add_argument("--mesh", action="append", default=[],
                      help="data,fsdp,tensor sizes, e.g. 'data=1,fsdp=-1,tensor=4' (repeatable; "
                           "default: the recipe's mesh)")
  parser.add_argument("--remat", action="append", default=[], choices=REMAT_POLICIES,
                      help="remat policy to compare (repeatable; default: the recipe's)")
  parser.add_argument("--attention", action="append", default=[], choices=ATTENTION_IMPLS,
                      help="attention back-end to compare (repeatable; default: the recipe's)")
  parser.add_argument("--compiler", default="auto", choices=devices.COMPILERS,
                      help="auto: the TPU compiler for TPU targets when libtpu is installed, else "
                           "the CPU compiler on simulated devices")
  parser.add_argument("--mfu", type=float, default=0.4,
                      help="model FLOPs utilisation assumed for step time and tokens/s")
  parser.add_argument("--hbm_reserve", type=float, default=0.1,
                      help="fraction of each chip's HBM kept free (runtime, fragmentation, "
                           "estimate error) when judging whether a variant fits")
  parser.add_argument("--json", dest="json_path", default=None,
                      help="also write every figure to this JSON file")
  return parser


def parse_recipe(files: Sequence[str], bindings: Sequence[str],
                 search_paths: Sequence[str]) -> None:
  """Parses gin like ``medllama-train`` but leaves the config unfinalised: finalising checks that
  every macro is set, and a plan never reads what ``RUN_DIR``/``DATA_DIR``/``INIT_CHECKPOINT`` name."""
  gin_flags.parse_gin(files, bindings, search_paths, finalize=False)


def plan(targets: Sequence[Target], compilers: Sequence[str], variants: Sequence[planner.Variant]
         ) -> list[planner.PlanResult]:
  """Compiles every variant for every target (with that target's compiler), in the order given."""
  import jax

  from medllama_jax.config import model_config
  from medllama_jax.plan import planner  # noqa: F811

  config, settings = model_config(), planner.TrainSettings.from_gin()
  results = []
  for target, compiler in zip(targets, compilers):
    target_devices = devices.devices_for(compiler, target)
    for variant in variants:
      logging.info("planning %d/%d on %s", len(results) + 1, len(targets) * len(variants),
                   target.describe())
      results.append(planner.plan_variant(config, settings, variant, target, compiler,
                                          target_devices))
      jax.clear_caches()
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, bindings = gin_flags.parse_command(parser, argv)
  return console.run(parser.prog, args, lambda: _plan_and_report(args, bindings))


def _plan_and_report(args: argparse.Namespace, bindings: Sequence[str]) -> int:
  from medllama_jax import partitioning
  from medllama_jax.config import model_config
  from medllama_jax.plan import planner, report

  try:
    targets = [parse_target(spec) for spec in args.topology]
    compilers = [devices.choose_compiler(args.compiler, target) for target in targets]
    meshes = [partitioning.parse_mesh_spec(spec) for spec in args.mesh] or [None]
    mfu, reserve = report.check_mfu(args.mfu), report.check_reserve(args.hbm_reserve)
  except ValueError as e:
    raise console.UsageError(str(e)) from e
  devices.prepare_backend(max([t.num_chips for t, c in zip(targets, compilers) if c == "cpu"]
                              or [1]))
  parse_recipe(args.gin_file, [*args.gin_bindings, *bindings], args.gin_search_path)
  variants = [planner.Variant(mesh=m, remat=r, attention=a) for m, r, a in
              itertools.product(meshes, args.remat or [None], args.attention or [None])]
  results = plan(targets, compilers, variants)
  config, settings = model_config(), planner.TrainSettings.from_gin()
  print(report.describe_run(config, settings))
  print()
  print(report.comparison_table(results, settings, reserve, mfu))
  print()
  print(report.compiler_notes(results))
  if args.json_path:
    with open(args.json_path, "w") as f:
      json.dump({"model": config.to_hf_dict(), "settings": dataclasses.asdict(settings),
                 "mfu": mfu, "hbm_reserve": reserve,
                 "results": [r.to_json() for r in results]}, f, indent=2)
    logging.info("figures written to %s", args.json_path)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
