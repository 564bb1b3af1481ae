"""``medllama-generate``: text generation from a model folder (Orbax from ``medllama-convert``, or HF).

  medllama-generate --model DIR --prompt "The patient presented with" [--prompt ...]
      [--max_new_tokens 64] [--temperature 0 --top_k 0 --top_p 1.0 --seed 0]
      [--dtype float32|bfloat16] [--mesh data=1,fsdp=-1,tensor=1] [--json]
      [--chat [--chat_template medllama]]

Prompts are batched (left-padded) and decoded with a KV cache; greedy unless --temperature > 0.
With --chat, each prompt is one user turn rendered in a chat template (medllama_jax.chat), and the
assistant's answer is generated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import logging

from medllama_jax import chat
from medllama_jax.cli import console
from medllama_jax.data.instruct import USER, Conversation, Turn
from medllama_jax.tokenizer import Tokenizer


def build_parser() -> console.ArgumentParser:
  parser = console.make_parser("medllama-generate", __doc__)
  parser.add_argument("--model", required=True, help="model folder: Orbax (params/) or Hugging Face")
  parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (weights are cast to it as well)")
  parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                      help="mesh axis sizes, e.g. 2,2,2 or data=2,fsdp=2,tensor=2 (-1 = the rest)")
  parser.add_argument("--attention", choices=("xla", "dot_product", "cudnn", "splash"), default="xla")
  console.add_skip_checksums_flag(parser)
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object per prompt: prompt, text, token_ids (generated)")
  parser.add_argument("--chat", action="store_true",
                      help="wrap each prompt as a user turn of --chat_template; generate the answer")
  parser.add_argument("--chat_template", choices=sorted(chat.TEMPLATES),
                      default=chat.DEFAULT_TEMPLATE, help="with --chat (see medllama_jax/chat.py)")
  return parser


def encode_prompt(tok: Tokenizer, prompt: str, chat_template: str | None = None) -> list[int]:
  """Prompt ids: the text as the tokenizer encodes it (with the BOS it adds, as transformers), or
  with a ``chat_template`` what an instruction-tuned model saw before the answer to ``prompt`` as
  its one user turn."""
  if chat_template is None:
    return tok.encode(prompt)
  return chat.render_prompt(Conversation((Turn(USER, prompt),)), tok, chat_template)


def _generate(args) -> int:
  from medllama_jax import decode, loading, partitioning

  partitioning.initialize_distributed()
  mesh = partitioning.make_mesh(**partitioning.parse_mesh_spec(args.mesh))
  loaded = loading.load_model(args.model, mesh, dtype=args.dtype, param_dtype=args.dtype,
                              attention_impl=args.attention,
                              verify_checksums=not args.skip_checksums)
  tok = loaded.tokenizer
  template = args.chat_template if args.chat else None
  prompts = [encode_prompt(tok, p, template) for p in args.prompt]
  sampling = decode.SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   seed=args.seed, max_new_tokens=args.max_new_tokens)
  eos_ids = tuple(loaded.config.eos_token_ids) or ((tok.eos_id,) if tok.eos_id is not None else ())
  logging.info("generating up to %d tokens for %d prompt(s)", args.max_new_tokens, len(prompts))
  outputs = decode.generate(loaded.model, loaded.params, prompts, sampling, eos_ids=eos_ids,
                            pad_id=0, mesh=mesh, rules=loaded.rules)
  for prompt, ids in zip(args.prompt, outputs):
    text = tok.decode(ids)
    if args.json:
      print(json.dumps({"prompt": prompt, "text": text, "token_ids": list(ids)}))
    else:
      print(f"{prompt}{text}\n")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  return console.run(parser.prog, args, lambda: _generate(args))


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
