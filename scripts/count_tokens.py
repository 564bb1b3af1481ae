"""Prepared corpus folders → token_stats.json in each, for mixing rates counted in tokens.

  python scripts/count_tokens.py data/pubmed_abstracts data/pmc_fulltext ... --vocabulary ckpt/llama2-13b

--vocabulary is the model folder (or tokenizer file) training uses: the counts are keyed by its
tokenizer, and register_pretrain_mixture(rate_unit="tokens") uses only counts of its own tokenizer.
Prints each folder's documents and tokens per split. See medllama_jax/data/token_stats.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from medllama_jax.cli import console


def build_parser():
  parser = console.make_parser("count_tokens", __doc__)
  parser.add_argument("corpus_dir", nargs="+", help="a folder written by prepare_corpus.py")
  parser.add_argument("--vocabulary", required=True, help="model folder or tokenizer file")
  return parser


def _count(corpus_dirs: Sequence[str], vocabulary_path: str) -> int:
  from medllama_jax.data import token_stats
  from medllama_jax.data.vocab import model_vocabulary

  vocabulary = model_vocabulary(vocabulary_path)
  for corpus_dir in corpus_dirs:
    stats = token_stats.write_token_stats(corpus_dir, vocabulary)
    counts = ", ".join(f"{split} {s['documents']} documents {s['tokens']} tokens"
                       for split, s in stats["splits"].items())
    print(f"{corpus_dir}: {counts}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  return console.run(parser.prog, args, lambda: _count(args.corpus_dir, args.vocabulary))


if __name__ == "__main__":
  sys.exit(main())
