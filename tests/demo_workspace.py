"""A small SentencePiece tokenizer and a prepared general corpus from the demo text, for the tests
that train or evaluate a tiny model end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from medllama_jax import tokenizer
from medllama_jax.data import records
from medllama_jax.demo import demo_text_path


def write_tokenizer(tok_dir: Path) -> Path:
  """A 512-piece SentencePiece model of the demo text as ``tok_dir/tokenizer.model``."""
  tok_dir.mkdir()
  model_file = tokenizer.train_sentencepiece(demo_text_path(), str(tok_dir / "tok"), 512)
  os.replace(model_file, tok_dir / tokenizer.SENTENCEPIECE_FILE)
  return tok_dir


def prepare_general_corpus(root: Path, num_shards: int) -> None:
  """The demo text, three lines per document, as ``root/general.jsonl`` prepared into
  ``root/data/redpajama`` (a fifth held out for validation)."""
  lines = [line.strip() for line in open(demo_text_path()) if line.strip()]
  corpus = root / "general.jsonl"
  corpus.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3]), "meta": {}}) + "\n"
                            for i in range(0, len(lines), 3)))
  records.prepare("jsonl", [str(corpus)], str(root / "data" / "redpajama"), num_shards=num_shards,
                  validation_fraction=0.2)
