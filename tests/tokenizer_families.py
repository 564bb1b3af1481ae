"""Tokenizer folders of the three families LLaMA-architecture checkpoints ship, built offline.

* ``sentencepiece_llama2``: a SentencePiece BPE ``tokenizer.model`` with LLaMA 2's trainer options
  and the ``tokenizer_config.json`` of a ``LlamaTokenizer`` (BOS added, no EOS).
* ``llama3``: a byte-level BPE ``tokenizer.json`` with LLaMA 3's pre-tokenizer regex, its special
  tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|eot_id|>``, header ids) and a template
  post-processor that adds BOS; ``PreTrainedTokenizerFast`` as its class, as Meta ships it.
* ``gpt2_no_bos``: a GPT-2-style byte-level BPE (``<|endoftext|>`` for BOS, EOS and UNK) whose
  post-processor adds nothing, with ``GPT2Tokenizer`` as its class (SmolLM's layout).

Each is trained on the demo text shipped in the package, deterministically.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from medllama_jax import tokenizer

FAMILIES = ("sentencepiece_llama2", "llama3", "gpt2_no_bos")
LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
LLAMA3_SPECIALS = (LLAMA3_BOS, LLAMA3_EOS, "<|start_header_id|>", "<|end_header_id|>", LLAMA3_EOT)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPECIAL = "<|endoftext|>"


def demo_text_path() -> str:
  return str(importlib.resources.files("medllama_jax") / "demo_data" / "medical_notes.txt")


def _write_json(path: Path, content: dict) -> None:
  path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _byte_level_bpe(pre_tokenizer, special_tokens: tuple[str, ...], vocab_size: int
                    ) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train([demo_text_path()], trainer)
  return tok


def sentencepiece_llama2(folder: Path, vocab_size: int = 512) -> Path:
  model = tokenizer.train_sentencepiece(demo_text_path(), folder / "sp" / "tok", vocab_size)
  shutil.copyfile(model, folder / tokenizer.SENTENCEPIECE_FILE)
  shutil.rmtree(folder / "sp")
  tokenizer.write_hf_tokenizer_config(folder)
  return folder


def llama3(folder: Path, vocab_size: int = 600) -> Path:
  split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
  tok = _byte_level_bpe(pre_tokenizers.Sequence([
      split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
      LLAMA3_SPECIALS, vocab_size)
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{LLAMA3_BOS}:0 $A:0",
                                    pair=f"{LLAMA3_BOS}:0 $A:0 {LLAMA3_BOS}:1 $B:1",
                                    special_tokens=[(LLAMA3_BOS, tok.token_to_id(LLAMA3_BOS))])])
  tok.save(str(folder / tokenizer.HF_TOKENIZER_FILE))
  _write_json(folder / tokenizer.HF_TOKENIZER_CONFIG_FILE, {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": LLAMA3_BOS,
      "eos_token": LLAMA3_EOS, "clean_up_tokenization_spaces": True,
      "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072})
  return folder


def gpt2_no_bos(folder: Path, vocab_size: int = 600) -> Path:
  tok = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), (GPT2_SPECIAL,),
                        vocab_size)
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.save(str(folder / tokenizer.HF_TOKENIZER_FILE))
  _write_json(folder / tokenizer.HF_TOKENIZER_CONFIG_FILE, {
      "tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_SPECIAL, "eos_token": GPT2_SPECIAL,
      "unk_token": GPT2_SPECIAL, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
      "model_max_length": 2048})
  return folder


BUILDERS = {"sentencepiece_llama2": sentencepiece_llama2, "llama3": llama3,
            "gpt2_no_bos": gpt2_no_bos}


def build(family: str, folder: os.PathLike | str) -> Path:
  """The tokenizer folder of ``family`` (:data:`FAMILIES`) written into ``folder``."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  return BUILDERS[family](folder)
