"""``medllama-eval``: MIBE (and MMLU) evaluation of a model folder, from flags or from gin.

  medllama-eval --model DIR --data_dir DIR --out DIR [--tasks pubmedqa,medqa|all|all,mmlu]
      [--num_shots 0,5] [--prompt_variant release|fixed] [--fewshot_seed 1234]
      [--max_new_tokens 256] [--batch_size 8] [--stop STRING ...] [--no_option_scoring]
      [--write_predictions] [--mesh data=1,fsdp=-1,tensor=1] [--dtype float32|bfloat16]

  medllama-eval --gin_file=eval_mibe.gin --gin.CHECKPOINT=\\"DIR\\" --gin.DATA_DIR=\\"DIR\\" \\
      --gin.OUT_DIR=\\"DIR\\" [--write_predictions]

``--tasks`` names datasets (``medllama_jax/eval/datasets.py``; ``all`` stands for the 12 MIBE
datasets, ``mmlu`` is the general-domain one); each is read from ``{data_dir}/{dataset}/`` and
tokenized with the model folder's tokenizer. The gin form runs ``evaluator.evaluate`` as bound
(``gin/eval_mibe.gin``); gin files are looked up as ``medllama-train`` looks them up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import seqio_tasks.mibe
from medllama_jax import chat, logs, partitioning
from medllama_jax.eval import evaluator
from medllama_jax.eval.datasets import MIBE_DATASETS
from medllama_jax.train.cli import parse_gin, split_gin_flags


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="medllama-eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable); then the flags below other than "
                           "--write_predictions are not used")
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--gin_search_path", action="append", default=[])
  parser.add_argument("--model", help="model folder: Orbax (params/) or Hugging Face")
  parser.add_argument("--data_dir", help="folder with one sub-folder per dataset")
  parser.add_argument("--out", help="folder for results.json, results.md, tensorboard/")
  parser.add_argument("--tasks", default="all",
                      help="comma-separated datasets; 'all' = the 12 MIBE datasets")
  parser.add_argument("--num_shots", default="0", help="comma-separated shot counts")
  parser.add_argument("--prompt_variant", choices=("release", "fixed"), default="release")
  parser.add_argument("--fewshot_seed", type=int, default=seqio_tasks.mibe.DEFAULT_FEWSHOT_SEED)
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--stop", action="append", default=[],
                      help="cut generated text at this string (repeatable; the release uses none)")
  parser.add_argument("--no_option_scoring", action="store_true",
                      help="skip the log-likelihood ranking of multiple-choice options")
  parser.add_argument("--write_predictions", action="store_true",
                      help="also write predictions/{task}.jsonl")
  parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--chat_template", choices=sorted(chat.TEMPLATES), default=None,
                      help="wrap prompts in this chat template (instruction-tuned models)")
  parser.add_argument("--adapters", default=None, help="LoRA adapter folder, run unmerged")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, gin_flags = split_gin_flags(argv)
  except ValueError as e:
    print(f"medllama-eval: {e}", file=sys.stderr)
    return 2
  parser = build_parser()
  args = parser.parse_args(rest)
  logs.setup()
  partitioning.initialize_distributed()
  if args.gin_file:
    parse_gin(args.gin_file, [*args.gin_bindings, *gin_flags], args.gin_search_path)
    evaluator.evaluate(**({"write_predictions": True} if args.write_predictions else {}))
    return 0
  missing = [flag for flag in ("model", "data_dir", "out") if getattr(args, flag) is None]
  if missing:
    parser.error(f"without --gin_file, give {', '.join('--' + m for m in missing)}")
  datasets = [dataset for item in args.tasks.split(",")
              for dataset in (MIBE_DATASETS if item == "all" else (item,))]
  names = seqio_tasks.mibe.register_mibe_tasks(
      args.data_dir, args.model, datasets=datasets,
      num_shots=[int(k) for k in args.num_shots.split(",")], prompt_variant=args.prompt_variant,
      fewshot_seed=args.fewshot_seed)
  evaluator.evaluate(args.model, names, args.out, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, stop_sequences=args.stop,
                     score_options=not args.no_option_scoring,
                     write_predictions=args.write_predictions, mesh=args.mesh, dtype=args.dtype,
                     chat_template=args.chat_template, adapters=args.adapters)
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
