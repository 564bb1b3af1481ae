"""``medllama-lm-eval``: lm-evaluation-harness's own command line, with our model registered.

  medllama-lm-eval --model medllama-jax \\
      --model_args model=DIR,mesh=data=1;fsdp=-1;tensor=1,dtype=bfloat16[,adapters=DIR] \\
      --tasks mmlu,arc_challenge,hellaswag [--num_fewshot 5] [--batch_size 8] \\
      [--include_path TASK_YAML_DIR] [--output_path OUT] [--log_samples] [--limit N]

Every argument is lm_eval's (``lm-eval run --help``); lm_eval offers no entry point through which an
installed package adds a model, so this command imports ``medllama_jax.eval.harness`` (which
registers ``medllama-jax``) and then runs lm_eval's CLI. ``model_args`` are ``MedllamaLM``'s: inside
them ``;`` separates the mesh's axes, since ``,`` separates the arguments. ``--debug`` and
``--log_dir`` are ours (the log file and one-line errors of every ``medllama-*`` command); lm_eval's
results table goes to stdout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from medllama_jax.cli import console


@contextlib.contextmanager
def _argv(argv: Sequence[str]) -> Iterator[None]:
  """lm_eval's parser reads ``sys.argv`` itself (it inserts the default ``run`` subcommand there)."""
  saved = sys.argv
  sys.argv = ["medllama-lm-eval", *argv]
  try:
    yield
  finally:
    sys.argv = saved


def _evaluate(argv: Sequence[str]) -> int:
  # lm_eval's cli_evaluate without its setup_logging: the records go to our log file instead.
  from lm_eval._cli import HarnessCLI

  import medllama_jax.eval.harness  # noqa: F401 (registers the "medllama-jax" model)

  with _argv(argv):
    parser = HarnessCLI()
    parser.execute(parser.parse_args())
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = console.ArgumentParser(prog="medllama-lm-eval", add_help=False)  # --help is lm_eval's
  console.add_console_flags(parser)
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  return console.run(parser.prog, args, lambda: _evaluate(rest))


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
