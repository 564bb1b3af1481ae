"""``medllama-forgetting``: general-domain and MIBE scores of a base model and its descendants, in
one table of values and deltas against the base (what Me-LLaMA reports as catastrophic forgetting).

  medllama-forgetting --out DIR --model NAME=DIR [--model NAME=DIR ...] [--base NAME]
      [--run RUN_DIR ... [--every N]]
      [--harness_tasks arc_easy,hellaswag,...] [--include_path DIR] [--num_fewshot K] [--limit N]
      [--mibe_tasks pubmedqa,medqa|all --data_dir DIR [--mibe_num_shots 0]]
      [--max_new_tokens 256] [--batch_size 8] [--chat_template medllama]
      [--mesh data=1,fsdp=-1,tensor=1] [--dtype float32|bfloat16] [--skip_checksums]
      [--gin_file forgetting.gin] [--gin.ForgettingStudy.limit=100]

Models: each ``--model NAME=DIR`` (a model folder, Orbax or Hugging Face) and, for each ``--run``, the
first and every N-th complete checkpoint of that training run and its ``final_model`` (named
``RUN@STEP``). The base, which deltas are taken against, is ``--base`` or the first model.

Tasks: ``--harness_tasks`` are lm-evaluation-harness tasks (the optional ``lm_eval`` extra), from
lm_eval's own task folder and ``--include_path`` (local task YAMLs; datasets come from the
Hugging Face cache, or local files the YAMLs name, when offline); default: the paper's general set
(``gin/forgetting.gin``: mmlu, arc_challenge, arc_easy, hellaswag, piqa, boolq, winogrande,
truthfulqa_mc2); an empty value runs none. ``--mibe_tasks`` are MIBE datasets read from
``--data_dir`` and scored as ``medllama-eval`` scores them. Flags override the gin bindings of
``ForgettingStudy``.

Written to ``--out``: ``forgetting.md``, ``forgetting.json``, ``models/NAME/`` and, for runs,
TensorBoard scalars ``forgetting/TASK/METRIC`` and ``forgetting_delta/TASK/METRIC`` per training
step under ``tensorboard/RUN`` (``medllama_jax/eval/forgetting.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from medllama_jax import chat
from medllama_jax.cli import console, gin_flags
from medllama_jax.cli import eval as eval_cli


def build_parser() -> console.ArgumentParser:
  parser = gin_flags.gin_parser("medllama-forgetting", __doc__, "ForgettingStudy.limit = 100",
                                gin_file_required=False)
  parser.add_argument("--out", required=True, help="folder for the report")
  parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                      help="a model folder and its column name (repeatable; the first is the "
                           "base unless --base)")
  parser.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                      help="a training run: its checkpoints and final_model (repeatable)")
  parser.add_argument("--every", type=int, default=1,
                      help="with --run: every N-th complete checkpoint, from the first")
  parser.add_argument("--base", default=None, help="the model the deltas are taken against")
  parser.add_argument("--harness_tasks", default=None,
                      help="comma-separated lm-evaluation-harness tasks (default: the paper's "
                           "general set; '' for none)")
  parser.add_argument("--include_path", default=None, help="folder of local harness task YAMLs")
  parser.add_argument("--num_fewshot", type=int, default=None,
                      help="harness shots (default: each task's own)")
  parser.add_argument("--limit", type=int, default=None, help="harness examples per task")
  parser.add_argument("--seed", type=int, default=None, help="harness seed (default 0)")
  parser.add_argument("--mibe_tasks", default=None,
                      help="comma-separated MIBE datasets ('all' = the 12); needs --data_dir")
  parser.add_argument("--data_dir", default=None, help="folder with one sub-folder per dataset")
  parser.add_argument("--mibe_num_shots", default=None, help="comma-separated shot counts (0)")
  parser.add_argument("--max_new_tokens", type=int, default=None,
                      help="per generated answer (256)")
  parser.add_argument("--batch_size", type=int, default=None, help="rows per batch (8)")
  parser.add_argument("--chat_template", choices=sorted(chat.TEMPLATES), default=None,
                      help="wrap MIBE prompts in this chat template")
  parser.add_argument("--mesh", default=None, help="mesh axis sizes (data=1,fsdp=-1,tensor=1)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  console.add_skip_checksums_flag(parser)
  return parser


def _named_models(specs: Sequence[str]) -> list[tuple[str, str]]:
  """``--model NAME=DIR`` as (name, folder); a malformed one is a usage error."""
  out = []
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise console.UsageError(f"--model {spec!r}: expected NAME=DIR")
    out.append((name, path))
  return out


def _study_overrides(args: argparse.Namespace) -> dict[str, Any]:
  """The ``ForgettingStudy`` fields given as flags (the rest come from gin or the defaults)."""
  overrides = {name: getattr(args, name)
               for name in ("include_path", "num_fewshot", "limit", "seed", "data_dir",
                            "max_new_tokens", "batch_size", "chat_template", "mesh", "dtype")
               if getattr(args, name) is not None}
  if args.harness_tasks is not None:
    overrides["harness_tasks"] = [t.strip() for t in args.harness_tasks.split(",") if t.strip()]
  if args.mibe_tasks is not None:
    overrides["mibe_tasks"] = eval_cli._datasets(args.mibe_tasks)  # pylint: disable=protected-access
  if args.mibe_num_shots is not None:
    overrides["mibe_num_shots"] = [int(k) for k in args.mibe_num_shots.split(",")]
  if args.skip_checksums:
    overrides["verify_checksums"] = False
  return overrides


def _study(args: argparse.Namespace, bindings: Sequence[str]) -> int:
  from medllama_jax.eval import forgetting

  if args.gin_file or args.gin_bindings or bindings:
    gin_flags.apply_gin(args, bindings)
  try:
    study = forgetting.ForgettingStudy(**_study_overrides(args))
    entries = [forgetting.ModelEntry(name, path) for name, path in _named_models(args.model)]
    entries += [entry for run_dir in args.run for entry in forgetting.run_models(run_dir, args.every)]
  except ValueError as e:
    raise console.UsageError(str(e)) from e
  forgetting.study_forgetting(entries, study, args.out, args.base)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, bindings = gin_flags.parse_command(parser, argv)
  if not args.model and not args.run:
    parser.error("give at least one --model NAME=DIR or --run RUN_DIR")
  return console.run(parser.prog, args, lambda: _study(args, bindings), show_log_path=True)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
