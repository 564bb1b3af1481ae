"""The embedded default job, as ``scripts/demo.sh`` runs it: Me-LLaMA's cycle, end to end, small, on CPU.

  python -m medllama_jax.cli.demo --out demo_output [--overwrite]

Eight steps on 8 simulated CPU devices (``medllama_jax/demo.py`` says what each does): a tokenizer,
the prepared corpora, a starting model, continual pre-training killed and resumed, LoRA instruction
tuning, the Hugging Face export checked by transformers, generation, and the MIBE evaluation. Each
step is announced when it starts; the trainer's progress is shown as it runs; details go to the log
files in ``OUT/logs``. A non-empty ``--out`` that no earlier demo wrote is refused unless
``--overwrite``: the demo never deletes what it did not write.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

from medllama_jax.cli import console

# Written into --out: a folder holding it is an earlier demo's, which a rerun may replace.
OUT_MARKER = ".medllama-demo"


def prepare_out_dir(out: str, overwrite: bool) -> None:
  """Makes ``out`` the demo's folder: new, empty, or an earlier demo's (replaced). Any other
  non-empty folder is refused unless ``overwrite``: the demo never deletes what it did not write."""
  if os.path.isdir(out) and os.listdir(out):
    if not (overwrite or os.path.exists(os.path.join(out, OUT_MARKER))):
      raise console.UsageError(f"--out {out}: the folder is not empty and no earlier demo wrote "
                               "it; name a new folder, or add --overwrite to replace its contents")
    shutil.rmtree(out)
  elif os.path.exists(out) and not os.path.isdir(out):
    raise console.UsageError(f"--out {out}: exists and is not a folder")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, OUT_MARKER), "w") as marker:
    marker.write("written by python -m medllama_jax.cli.demo; rerunning the demo replaces this "
                 "folder\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = console.make_parser("medllama-demo", __doc__)
  parser.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out even when it is a non-empty folder no demo wrote")
  parser.add_argument("--max_new_tokens", type=int, default=24, help="per generation (step 7)")
  parser.add_argument("--eval_max_new_tokens", type=int, default=8,
                      help="per evaluation answer (step 8)")
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  try:
    prepare_out_dir(out, args.overwrite)
  except console.UsageError as e:
    parser.error(str(e))
  args.log_dir = args.log_dir or os.path.join(out, "logs")
  return console.run(parser.prog, args, lambda: _run(args, out), show_log_path=True)


def _run(args, out: str) -> int:
  from medllama_jax import demo  # Sets up the 8 simulated devices before it imports jax.

  return demo.run_demo(out, args.log_dir, args.max_new_tokens, args.eval_max_new_tokens)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
