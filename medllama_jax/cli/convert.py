"""``medllama-convert``: move LLaMA weights between Hugging Face, Meta and this project's format.

  medllama-convert hf-to-orbax   --hf_dir DIR   --out DIR [--dtype bfloat16]
  medllama-convert meta-to-orbax --meta_dir DIR --out DIR [--dtype bfloat16] [--tokenizer_dir DIR]
  medllama-convert orbax-to-hf   --ckpt DIR     --out DIR [--dtype bfloat16] [--max_shard_size 5GB]
  medllama-convert merge-lora    --adapters DIR --out DIR [--base DIR] [--dtype bfloat16]

merge-lora writes the model folder of a base model with LoRA adapters merged in (the base defaults to
the one the adapter folder records); orbax-to-hf exports it like any other.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from medllama_jax.cli import console

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
  """``"5GB"``, ``"500MB"``, ``"1024"`` → bytes."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
  unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
  return int(float(match.group(1)) * 1024 ** " KMGT".index(unit or " "))


def build_parser() -> console.ArgumentParser:
  parser = console.make_parser("medllama-convert", __doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  to_orbax = commands.add_parser("hf-to-orbax", help="HF folder → model folder (Orbax)")
  to_orbax.add_argument("--hf_dir", required=True)
  from_meta = commands.add_parser("meta-to-orbax", help="Meta consolidated.*.pth → model folder")
  from_meta.add_argument("--meta_dir", required=True)
  from_meta.add_argument("--tokenizer_dir", default=None,
                         help="folder with tokenizer.model when it is not in --meta_dir")
  to_hf = commands.add_parser("orbax-to-hf", help="model folder → HF folder for transformers")
  to_hf.add_argument("--ckpt", required=True)
  to_hf.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"))
  console.add_skip_checksums_flag(to_hf)
  merge = commands.add_parser("merge-lora", help="base model folder + LoRA adapters → model folder")
  merge.add_argument("--adapters", required=True, help="adapter folder (e.g. RUN_DIR/adapters)")
  merge.add_argument("--base", default=None,
                     help="base model folder (default: the one recorded in the adapter folder)")
  console.add_skip_checksums_flag(merge)
  for command in (to_orbax, from_meta, to_hf, merge):
    console.add_console_flags(command, subcommand=True)
    command.add_argument("--out", required=True, help="new output folder (must not exist)")
    command.add_argument("--dtype", choices=_DTYPES, default="auto",
                         help="stored dtype of the output (auto: as in the input)")
  return parser


def _convert(args: argparse.Namespace) -> int:
  from medllama_jax import loading, partitioning
  from medllama_jax.convert import hf, meta

  if args.command == "hf-to-orbax":
    hf.hf_to_orbax(args.hf_dir, args.out, args.dtype)
  elif args.command == "meta-to-orbax":
    meta.meta_to_orbax(args.meta_dir, args.out, args.dtype, args.tokenizer_dir)
  elif args.command == "orbax-to-hf":
    hf.orbax_to_hf(args.ckpt, args.out, args.dtype, args.max_shard_size,
                   verify_checksums=not args.skip_checksums)
  else:
    loading.merge_lora(args.base, args.adapters, args.out, partitioning.make_mesh(),
                       None if args.dtype == "auto" else args.dtype,
                       verify_checksums=not args.skip_checksums)
  print(f"medllama-convert: wrote {args.out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  return console.run(parser.prog, args, lambda: _convert(args))


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
