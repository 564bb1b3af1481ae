"""medllama_jax.tokenizer against transformers' AutoTokenizer on the three tokenizer families
LLaMA-architecture checkpoints ship (tests/tokenizer_families.py), fully offline."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import tensorflow as tf
import transformers

import tokenizer_families as families
from medllama_jax import chat
from medllama_jax.data.instruct import ASSISTANT, USER, Conversation, Turn
from medllama_jax.data.vocab import model_vocabulary
from medllama_jax.tokenizer import (TOKENIZER_FILES, copy_tokenizer_files, load_tokenizer,
                                    sentencepiece_merges, train_sentencepiece,
                                    write_hf_tokenizer_config)

NUM_RANDOM_STRINGS = 300
ATOMS = ("é", "中文", "🩺", "e\u0301", "ΑΒΓ", "\u00a0", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ",
         "123", "4567890", "3.14", "1,000", "<s>", "</s>", "<unk>", "<|begin_of_text|>",
         "<|eot_id|>", "<|endoftext|>", "'s", "don't", "...", "!?", "  x", "\r\n", "##", "▁")
EDGE_CASES = ("", " ", "  leading spaces", "trailing spaces  ", "hello", " hello", "<s>hello",
              "hello</s>", "a <s> b", "<|begin_of_text|>hi<|eot_id|>", "\n", "1000 mg",
              "Ünïcödé ☃ and emoji 🩺 fall back to bytes; double  spaces\tand tabs stay.")


def varied_strings() -> list[str]:
  """Edge cases plus seeded random mixes of demo-text words, unicode, whitespace runs, digits and
  special-token text."""
  words = Path(families.demo_text_path()).read_text(encoding="utf-8").split()
  rng = random.Random(0)
  strings = list(EDGE_CASES)
  for _ in range(NUM_RANDOM_STRINGS):
    parts = [rng.choice(words) if rng.random() < 0.6 else rng.choice(ATOMS)
             for _ in range(rng.randint(1, 10))]
    strings.append(rng.choice((" ", "", "  ", "\n", "\t")).join(parts))
  return strings


STRINGS = varied_strings()


@pytest.fixture(scope="module", params=families.FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
  return families.build(request.param, tmp_path_factory.mktemp(request.param))


def test_encode_equals_autotokenizer(family_dir: Path):
  ours = load_tokenizer(family_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(str(family_dir))
  mismatches = [s for s in STRINGS if ours.encode(s) != theirs(s).input_ids]
  assert not mismatches, f"{len(mismatches)} of {len(STRINGS)} differ, e.g. {mismatches[:3]}"
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                     theirs.pad_token_id)
  assert ours.vocab_size == len(theirs)


def test_decode_round_trips_as_transformers(family_dir: Path):
  ours = load_tokenizer(family_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(str(family_dir))
  for text in STRINGS:
    ids = ours.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text


def test_each_family_adds_what_its_definition_says(tmp_path: Path):
  expected = {"sentencepiece_llama2": ((1,), ()), "llama3": (("<|begin_of_text|>",), ()),
              "gpt2_no_bos": ((), ())}
  for family, (prefix, suffix) in expected.items():
    tok = load_tokenizer(families.build(family, tmp_path / family))
    names = tuple(tok.id_to_token(i) if isinstance(p, str) else i
                  for i, p in zip(tok.prefix_ids, prefix))
    assert (names, tok.suffix_ids) == (prefix, suffix), family
    assert tok.encode("x") == [*tok.prefix_ids, *tok.encode("x", add_special_tokens=False)]


@pytest.mark.parametrize("family", ["llama3", "gpt2_no_bos"])
def test_tokenizer_json_post_processor_beats_config_flags(tmp_path: Path, family: str):
  folder = families.build(family, tmp_path)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config.update(add_bos_token=family != "llama3", add_eos_token=True)
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
  assert ours.suffix_ids == () and len(ours.prefix_ids) == (family == "llama3")
  for text in STRINGS[:50]:
    assert ours.encode(text) == theirs(text).input_ids, text


def test_tokenizer_json_without_post_processor_adds_nothing(tmp_path: Path):
  folder = families.build("llama3", tmp_path)
  definition = json.loads((folder / "tokenizer.json").read_text())
  definition["post_processor"] = None
  (folder / "tokenizer.json").write_text(json.dumps(definition))
  ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
  assert ours.prefix_ids == ours.suffix_ids == ()
  assert [ours.encode(s) for s in STRINGS[:50]] == [theirs(s).input_ids for s in STRINGS[:50]]


@pytest.mark.parametrize("change", ["legacy", "no_prefix_space", "unstated_bos", "eos_too"])
def test_llama_config_variants_follow_transformers(tmp_path: Path, change: str):
  folder = families.build("sentencepiece_llama2", tmp_path)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  if change == "legacy":
    config["legacy"] = True
  elif change == "no_prefix_space":
    config["add_prefix_space"] = False
  elif change == "eos_too":
    config["add_eos_token"] = True
  else:
    del config["add_bos_token"], config["add_eos_token"]
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
  for text in STRINGS[:100]:
    assert ours.encode(text) == theirs(text).input_ids, text


def test_tokenizer_json_wins_and_llama_class_is_rebuilt(tmp_path: Path):
  """A LLaMA-2 folder as the Hub ships it (tokenizer.model + tokenizer.json + config)."""
  folder = families.build("sentencepiece_llama2", tmp_path / "sp")
  transformers.AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(tmp_path / "hub"))
  shutil.copyfile(folder / "tokenizer.model", tmp_path / "hub" / "tokenizer.model")
  ours = load_tokenizer(tmp_path / "hub")
  assert ours.source.endswith("tokenizer.json")
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hub"))
  assert [ours.encode(s) for s in STRINGS] == [theirs(s).input_ids for s in STRINGS]


def test_bare_meta_tokenizer_model_is_llama_convention(tmp_path: Path):
  """Meta's release ships tokenizer.model alone: BOS, no EOS, SentencePiece's own ids for text
  that neither starts with whitespace nor holds special-token text or a literal "▁"."""
  folder = families.build("sentencepiece_llama2", tmp_path)
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    (folder / name).unlink()
  ours = load_tokenizer(folder)
  sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
  assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (1, 2, 0, None)
  plain = [s for s in STRINGS if s and not s[0].isspace() and "<" not in s and "▁" not in s]
  assert len(plain) > 100
  for text in plain:
    assert ours.encode(text) == [1, *sp.encode(text)], text


def test_sentencepiece_merges_rank_by_joined_piece():
  assert sentencepiece_merges(["a", "b", "ab", "c", "abc", "bc"]) == [
      ("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]


def test_seqio_vocabulary_matches_tokenizer(family_dir: Path):
  tok, vocabulary = load_tokenizer(family_dir), model_vocabulary(str(family_dir))
  texts = STRINGS[:60]
  ragged = vocabulary.encode_tf(tf.constant(texts)).to_list()
  for text, row in zip(texts, ragged):
    plain = tok.encode(text, add_special_tokens=False)
    assert list(vocabulary.encode(text)) == plain == row, text
    assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == plain
  assert vocabulary.prefix_ids == tok.prefix_ids and vocabulary.eos_id == tok.eos_id
  ids = tok.encode("the patient", add_special_tokens=False)
  assert vocabulary.decode_tf(tf.constant([ids + [tok.eos_id, 3]])).numpy().tolist() == [
      b"the patient"]
  assert model_vocabulary(str(family_dir)) == vocabulary


def test_chat_rendering_starts_with_the_tokenizers_prefix(family_dir: Path):
  tok = load_tokenizer(family_dir)
  conversation = Conversation((Turn(USER, "What is HbA1c?"), Turn(ASSISTANT, "A glucose marker.")))
  ids, weights = chat.render(conversation, tok)
  assert tuple(ids[:len(tok.prefix_ids)]) == tok.prefix_ids and ids[-1] == tok.eos_id
  assert (ids, weights) == chat.render(conversation, model_vocabulary(str(family_dir)))


def test_special_tokens_map_fallback(tmp_path: Path):
  folder = families.build("llama3", tmp_path)
  (folder / "tokenizer_config.json").unlink()
  (folder / "special_tokens_map.json").write_text(
      json.dumps({"bos_token": {"content": families.LLAMA3_BOS, "special": True}}))
  tok = load_tokenizer(folder)
  assert tok.id_to_token(tok.bos_id) == families.LLAMA3_BOS and tok.eos_id is None


def test_unknown_special_token_names_the_file(tmp_path: Path):
  folder = families.build("llama3", tmp_path)
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<not-there>"}))
  # transformers adds such a token; so do we, with a fresh id.
  tok = load_tokenizer(folder)
  assert tok.id_to_token(tok.eos_id) == "<not-there>"


def test_vocabulary_needs_an_eos(tmp_path: Path):
  folder = families.build("llama3", tmp_path)
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": families.LLAMA3_BOS}))
  with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer names no EOS"):
    model_vocabulary(str(folder))


def test_malformed_files_are_named(tmp_path: Path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizers file"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").unlink()
  (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=r"tokenizer\.model: not a SentencePiece model"):
    load_tokenizer(tmp_path)


def test_load_tokenizer_missing_files(tmp_path: Path):
  with pytest.raises(FileNotFoundError) as excinfo:
    load_tokenizer(tmp_path)
  message = str(excinfo.value)
  assert str(tmp_path) in message and "tokenizer.model" in message and "tokenizer.json" in message


def test_copy_tokenizer_files(tmp_path: Path):
  src, dst = families.build("llama3", tmp_path / "src"), tmp_path / "out"
  (src / "unrelated.txt").write_text("not a tokenizer file", encoding="utf-8")
  assert copy_tokenizer_files(src, dst) == ["tokenizer.json", "tokenizer_config.json"]
  assert sorted(p.name for p in dst.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  assert set(TOKENIZER_FILES) >= {"tokenizer.model", "special_tokens_map.json"}


def test_train_sentencepiece_deterministic_llama_convention(tmp_path: Path):
  first = Path(train_sentencepiece(families.demo_text_path(), tmp_path / "tok", 512)).read_bytes()
  second = Path(train_sentencepiece(families.demo_text_path(), tmp_path / "tok", 512)).read_bytes()
  assert first == second
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
  assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"] and sp.pad_id() == -1
  digits = [p for p in sp.encode("1000 mg", out_type=str) if any(c.isdigit() for c in p)]
  assert digits == ["1", "0", "0", "0"]


def test_write_hf_tokenizer_config_needs_a_sentencepiece_model(tmp_path: Path):
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    write_hf_tokenizer_config(tmp_path)


def test_a_tokenizer_file_may_be_named_directly(tmp_path: Path):
  folder = families.build("sentencepiece_llama2", tmp_path / "sp")
  shutil.copyfile(folder / "tokenizer.model", tmp_path / "llama.model")
  bare = load_tokenizer(tmp_path / "llama.model")  # Meta's convention, like a bare folder
  assert bare.prefix_ids == (1,) and bare.encode("the heart") == load_tokenizer(folder).encode(
      "the heart")
  llama3 = families.build("llama3", tmp_path / "llama3")
  assert load_tokenizer(llama3 / "tokenizer.json").to_str() == load_tokenizer(llama3).to_str()
  assert model_vocabulary(str(tmp_path / "llama.model")).prefix_ids == (1,)
  with pytest.raises(ValueError, match="not a tokenizer folder"):
    load_tokenizer(llama3 / "tokenizer_config.json")
