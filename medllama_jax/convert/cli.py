"""``medllama-convert``: move LLaMA weights between Hugging Face, Meta and this project's format.

  medllama-convert hf-to-orbax   --hf_dir DIR   --out DIR [--dtype bfloat16]
  medllama-convert meta-to-orbax --meta_dir DIR --out DIR [--dtype bfloat16] [--tokenizer_dir DIR]
  medllama-convert orbax-to-hf   --ckpt DIR     --out DIR [--dtype bfloat16] [--max_shard_size 5GB]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence


from medllama_jax import logs
from medllama_jax.convert import hf, meta
from medllama_jax.convert.sources import ConversionError

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
  """``"5GB"``, ``"500MB"``, ``"1024"`` → bytes."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
  unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
  return int(float(match.group(1)) * 1024 ** " KMGT".index(unit or " "))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="medllama-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
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
  for command in (to_orbax, from_meta, to_hf):
    command.add_argument("--out", required=True, help="new output folder (must not exist)")
    command.add_argument("--dtype", choices=_DTYPES, default="auto",
                         help="stored dtype of the output (auto: as in the input)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logs.setup()
  try:
    if args.command == "hf-to-orbax":
      hf.hf_to_orbax(args.hf_dir, args.out, args.dtype)
    elif args.command == "meta-to-orbax":
      meta.meta_to_orbax(args.meta_dir, args.out, args.dtype, args.tokenizer_dir)
    else:
      hf.orbax_to_hf(args.ckpt, args.out, args.dtype, args.max_shard_size)
  except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"medllama-convert: error: {e}", file=sys.stderr)
    return 1
  print(f"medllama-convert: wrote {args.out}")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
