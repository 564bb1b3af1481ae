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

import gin
import jax
from absl import logging

from medllama_jax import logs, partitioning
from medllama_jax.config import ATTENTION_IMPLS, REMAT_POLICIES, model_config
from medllama_jax.plan import devices, planner, report
from medllama_jax.plan.topology import Target, parse_target
from medllama_jax.train import cli as train_cli


def build_parser() -> argparse.ArgumentParser:
  parser = train_cli.gin_parser("medllama-plan", __doc__, "train.num_microbatches = 8")
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
  train_cli.add_gin_search_paths(search_paths)
  gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)


def plan(targets: Sequence[Target], compilers: Sequence[str], variants: Sequence[planner.Variant]
         ) -> list[planner.PlanResult]:
  """Compiles every variant for every target (with that target's compiler), in the order given."""
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
  try:
    args, gin_flags = train_cli.parse_command(build_parser(), argv)
    targets = [parse_target(spec) for spec in args.topology]
    compilers = [devices.choose_compiler(args.compiler, target) for target in targets]
    meshes = [partitioning.parse_mesh_spec(spec) for spec in args.mesh] or [None]
    mfu, reserve = report.check_mfu(args.mfu), report.check_reserve(args.hbm_reserve)
  except ValueError as e:
    print(f"medllama-plan: {e}", file=sys.stderr)
    return 2
  logs.setup()
  devices.prepare_backend(max([t.num_chips for t, c in zip(targets, compilers) if c == "cpu"]
                              or [1]))
  parse_recipe(args.gin_file, [*args.gin_bindings, *gin_flags], args.gin_search_path)
  variants = [planner.Variant(mesh=m, remat=r, attention=a) for m, r, a in
              itertools.product(meshes, args.remat or [None], args.attention or [None])]
  try:
    results = plan(targets, compilers, variants)
  except (RuntimeError, jax.errors.JaxRuntimeError) as e:
    # Not enough simulated devices in this process, or libtpu unable to describe the slice (it
    # serves one process at a time on a machine).
    print(f"medllama-plan: {e}", file=sys.stderr)
    return 1
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
