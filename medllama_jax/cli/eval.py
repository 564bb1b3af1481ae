"""``medllama-eval``: MIBE (and MMLU) evaluation of a model folder, from flags or from gin.

  medllama-eval --model DIR --data_dir DIR --out DIR [--tasks pubmedqa,medqa|all|all,mmlu]
      [--num_shots 0,5] [--prompt_variant release|fixed] [--fewshot_seed 1234]
      [--max_new_tokens 256] [--batch_size 8] [--stop STRING ...] [--no_option_scoring]
      [--write_predictions] [--mesh data=1,fsdp=-1,tensor=1] [--dtype float32|bfloat16]

  medllama-eval --api_base_url https://api.openai.com/v1 --api_model gpt-4-0613 \\
      --tokenizer DIR --data_dir DIR --out DIR [--api_endpoint chat|completions] [--api_system TEXT]
      [--api_key_env OPENAI_API_KEY] [--api_concurrency 4] [--api_max_retries 5] [--api_timeout 120]

  medllama-eval --gin_file=eval_mibe.gin --gin.CHECKPOINT=\\"DIR\\" --gin.DATA_DIR=\\"DIR\\" \\
      --gin.OUT_DIR=\\"DIR\\" [--write_predictions]

``--tasks`` names datasets (``medllama_jax/eval/datasets.py``; ``all`` stands for the 12 MIBE
datasets, ``mmlu`` is the general-domain one); each is read from ``{data_dir}/{dataset}/`` and
tokenized with the model folder's tokenizer. With ``--api_base_url`` the prompts' text goes to a
served model instead (``medllama_jax/eval/api.py``; the key is read from the environment); the
tasks still tokenize their prompts when registered, with ``--tokenizer`` (a tokenizer
folder: ``tokenizer.model`` or ``tokenizer.json``; ``--model``'s by default), but nothing sent or scored
depends on those ids. Answers are cached under ``{out}/api_cache/``: rerunning after a failure
sends only the missing prompts. The gin form runs ``evaluator.evaluate`` as bound
(``gin/eval_mibe.gin``); gin files are looked up as ``medllama-train`` looks them up.
``--compare_to_paper MODEL`` (gin: ``write_results.paper_model``) adds the paper's published
zero-shot numbers for MODEL (``medllama_jax/eval/paper.py``) beside ours, in the ``release`` rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import gin

from medllama_jax import chat
from medllama_jax.cli import console, gin_flags
from medllama_jax.eval import api, paper
from medllama_jax.eval import datasets as mibe_datasets
from medllama_jax.eval.settings import EvalSettings

PAPER_MODEL_BINDING = "medllama_jax.eval.evaluator.write_results.paper_model"


def build_parser() -> console.ArgumentParser:
  # With --gin_file, the flags below other than --write_predictions are not used.
  parser = gin_flags.gin_parser("medllama-eval", __doc__, "evaluate.max_new_tokens = 64",
                                gin_file_required=False)
  parser.add_argument("--model", help="model folder: Orbax (params/) or Hugging Face")
  parser.add_argument("--data_dir", help="folder with one sub-folder per dataset")
  parser.add_argument("--out", help="folder for results.json, results.md, tensorboard/")
  parser.add_argument("--tasks", default="all",
                      help="comma-separated datasets; 'all' = the 12 MIBE datasets")
  parser.add_argument("--num_shots", default="0", help="comma-separated shot counts")
  parser.add_argument("--prompt_variant", choices=("release", "fixed"), default="release")
  parser.add_argument("--fewshot_seed", type=int, default=mibe_datasets.DEFAULT_FEWSHOT_SEED)
  parser.add_argument("--max_new_tokens", type=int, default=EvalSettings.max_new_tokens)
  parser.add_argument("--batch_size", type=int, default=EvalSettings.batch_size)
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
  console.add_skip_checksums_flag(parser)
  served = parser.add_argument_group("a model behind an OpenAI-compatible endpoint, instead of "
                                     "--model")
  served.add_argument("--api_base_url",
                      help="up to the API version: https://api.openai.com/v1, http://HOST:PORT/v1")
  served.add_argument("--api_model", help="the served model's name, e.g. gpt-4-0613")
  served.add_argument("--api_key_env", default=api.DEFAULT_KEY_ENV,
                      help="NAME of the environment variable that holds the API key")
  served.add_argument("--api_endpoint", choices=api.ENDPOINTS, default="chat",
                      help="chat: the prompt as the one user message; completions: the prompt "
                           "text (with --chat_template, wrapped in it)")
  served.add_argument("--api_system", default=None,
                      help="a system message before each prompt (chat endpoint)")
  served.add_argument("--api_concurrency", type=int, default=4, help="requests in flight at most")
  served.add_argument("--api_max_retries", type=int, default=5,
                      help="retries of a request after 408/429/5xx, timeouts, connection errors")
  served.add_argument("--api_timeout", type=float, default=120.0, help="seconds per request")
  served.add_argument("--tokenizer",
                      help="tokenizer folder (tokenizer.model or tokenizer.json) the tasks "
                           "are registered with; --model's by default")
  parser.add_argument("--compare_to_paper", choices=paper.MODELS, default=None, metavar="MODEL",
                      help="put the paper's published Table 3 numbers for MODEL beside ours in "
                           f"results.md/results.json; one of {', '.join(paper.MODELS)} (gin: "
                           "write_results.paper_model)")
  parser.add_argument("--bertscore_model", default=None, metavar="DIR",
                      help="local encoder folder for the summarisation tasks' BERTScore (the "
                           "release: bert-base-multilingual-cased, layer 9); without it n/a "
                           "(gin: register_mibe_tasks.bertscore_model_dir)")
  parser.add_argument("--length_bucket", type=int, default=EvalSettings.length_bucket,
                      help="pad prompts to a multiple of this many tokens: one compiled program "
                           "per bucket, so larger means fewer compilations and more padding")
  return parser


def _api_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> api.ApiSettings:
  """The served model's settings; a mistake in them is a usage error."""
  if args.api_model is None:
    parser.error("--api_base_url needs --api_model")
  if args.chat_template is not None and args.api_endpoint == "chat":
    parser.error("--chat_template is for --api_endpoint completions; a chat endpoint applies the "
                 "served model's own template")
  try:
    return api.ApiSettings(args.api_base_url, args.api_model, args.api_endpoint,
                           args.api_key_env, args.api_system, args.api_concurrency,
                           args.api_max_retries, args.api_timeout)
  except ValueError as e:
    parser.error(str(e))


def _evaluate_api(settings: api.ApiSettings, args: argparse.Namespace,
                  names: Sequence[str]) -> None:
  """Evaluates the served model on ``names``; an unreachable endpoint, a missing key or missing
  answers end the run with one line saying how to resume."""
  from medllama_jax.eval import evaluator

  eval_settings = EvalSettings(args.max_new_tokens, args.batch_size, tuple(args.stop),
                                         not args.no_option_scoring,
                                         chat_template=args.chat_template)
  backend = evaluator.ApiBackend(settings, os.path.join(args.out, "api_cache"))
  evaluator.evaluate_model(backend, names, args.out, eval_settings, args.api_model,
                           write_predictions=args.write_predictions)


def _vocabulary_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
  """A local model registers the tasks with its own tokenizer; an API run with --tokenizer."""
  if args.api_base_url is None:
    if args.tokenizer is not None:
      parser.error("--tokenizer is for --api_base_url runs; a local model brings its own")
    return args.model
  if args.tokenizer is None and args.model is None:
    parser.error("with --api_base_url, give --tokenizer (a folder holding tokenizer.model or "
                 "tokenizer.json) to register the tasks with")
  return args.tokenizer or args.model


def _datasets(tasks: str) -> list[str]:
  """``--tasks`` as dataset names (``all``: the 12 MIBE datasets); an unknown one is a usage
  error listing the known ones."""
  names = [name for item in tasks.split(",")
           for name in (mibe_datasets.MIBE_DATASETS if item == "all" else (item.strip(),))]
  unknown = [name for name in names if name not in mibe_datasets.SPECS]
  if unknown:
    raise console.UsageError(f"--tasks: unknown dataset(s) {', '.join(unknown)}; known: all, "
                             f"{', '.join(sorted(mibe_datasets.SPECS))}")
  return names


def _compare_to_paper(parser: argparse.ArgumentParser, model: str | None) -> None:
  """Binds ``write_results.paper_model`` to ``model`` if given (over any gin file's binding), and
  checks the model bound, if any, before the evaluation rather than after it."""
  if model is not None:
    with gin.unlock_config():
      gin.bind_parameter(PAPER_MODEL_BINDING, model)
  try:
    bound = gin.query_parameter(PAPER_MODEL_BINDING)
  except ValueError:  # not bound
    return
  try:
    paper.check_model(bound)
  except ValueError as e:
    parser.error(str(e))


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace,
              bindings: Sequence[str]) -> int:
  import seqio_tasks.mibe
  from medllama_jax import partitioning
  from medllama_jax.eval import evaluator

  partitioning.initialize_distributed()
  if args.gin_file:
    gin_flags.apply_gin(args, bindings)
    _compare_to_paper(parser, args.compare_to_paper)
    evaluator.evaluate(**({"write_predictions": True} if args.write_predictions else {}))
    return 0
  datasets = _datasets(args.tasks)
  settings = _api_settings(parser, args) if args.api_base_url else None
  names = seqio_tasks.mibe.register_mibe_tasks(
      args.data_dir, _vocabulary_path(parser, args), datasets=datasets,
      num_shots=[int(k) for k in args.num_shots.split(",")], prompt_variant=args.prompt_variant,
      fewshot_seed=args.fewshot_seed, bertscore_model_dir=args.bertscore_model)
  _compare_to_paper(parser, args.compare_to_paper)
  if settings is not None:
    _evaluate_api(settings, args, names)
    return 0
  evaluator.evaluate(args.model, names, args.out, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, stop_sequences=args.stop,
                     score_options=not args.no_option_scoring,
                     write_predictions=args.write_predictions, mesh=args.mesh, dtype=args.dtype,
                     chat_template=args.chat_template, adapters=args.adapters,
                     length_bucket=args.length_bucket,
                     verify_checksums=not args.skip_checksums)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, bindings = gin_flags.parse_command(parser, argv)
  if not args.gin_file:
    required = ("data_dir", "out") if args.api_base_url else ("model", "data_dir", "out")
    missing = [flag for flag in required if getattr(args, flag) is None]
    if missing:
      parser.error(f"without --gin_file, give {', '.join('--' + m for m in missing)}")
  return console.run(parser.prog, args, lambda: _evaluate(parser, args, bindings),
                     show_log_path=True)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
