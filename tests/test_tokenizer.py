"""Tests for medllama_jax.tokenizer, fully offline: every tokenizer is trained on the demo text."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from medllama_jax.tokenizer import (
    TOKENIZER_FILES,
    HFJsonTokenizer,
    SentencePieceTokenizer,
    copy_tokenizer_files,
    load_tokenizer,
    train_sentencepiece,
    write_hf_tokenizer_config,
)

VOCAB_SIZE = 512
BOS3, EOS3 = "<|begin_of_text|>", "<|end_of_text|>"
SAMPLES = [
    "The patient was started on metformin 500 mg twice daily.",
    "IMPRESSION: No acute cardiopulmonary process.",
    "Vitals: T 38.4 °C, HR 112, BP 94/58 mmHg, SpO2 91% on room air.",
    "Troponin rose from 0.02 to 0.85 ng/mL over 3 hours.",
    "Ünïcödé ☃ and emoji 🩺 fall back to bytes; double  spaces\tand tabs stay.",
]


@pytest.fixture(scope="session")
def demo_text_path() -> Path:
    path = Path(str(importlib.resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"))
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def demo_lines(demo_text_path: Path) -> list[str]:
    return demo_text_path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory: pytest.TempPathFactory, demo_text_path: Path) -> Path:
    """A model folder holding only a freshly trained ``tokenizer.model``."""
    work = tmp_path_factory.mktemp("sp_train")
    model_path = train_sentencepiece(demo_text_path, work / "tok", VOCAB_SIZE)
    folder = tmp_path_factory.mktemp("sp_model")
    shutil.copyfile(model_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def sp_tok(sp_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, demo_text_path: Path) -> Path:
    """A LLaMA-3-style folder: byte-level BPE ``tokenizer.json`` whose post-processor adds BOS itself."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[BOS3, EOS3],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(demo_text_path)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS3} $A", special_tokens=[(BOS3, tok.token_to_id(BOS3))]
    )
    folder = tmp_path_factory.mktemp("hf_model")
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": {"content": BOS3, "special": True},  # AddedToken-dict form
        "eos_token": EOS3,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_sentencepiece_special_ids(sp_tok: SentencePieceTokenizer) -> None:
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id, sp_tok.unk_id) == (1, 2, None, 0)
    assert sp_tok.vocab_size == VOCAB_SIZE
    assert [sp_tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_sentencepiece_round_trip(sp_tok: SentencePieceTokenizer, demo_lines: list[str]) -> None:
    for text in demo_lines + SAMPLES:
        ids = sp_tok.encode(text)
        assert ids[0] == sp_tok.bos_id and sp_tok.bos_id not in ids[1:]
        assert sp_tok.unk_id not in ids  # byte fallback covers unseen characters
        assert sp_tok.encode(text, add_bos=False) == ids[1:]
        assert sp_tok.decode(ids + [sp_tok.eos_id]) == text


def test_sentencepiece_splits_digits(sp_tok: SentencePieceTokenizer) -> None:
    pieces = [sp_tok.id_to_piece(i) for i in sp_tok.encode("1000 mg", add_bos=False)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "0", "0", "0"]


def test_load_tokenizer_prefers_sentencepiece(sp_dir: Path, hf_dir: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    shutil.copyfile(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_load_tokenizer_hf_json(hf_dir: Path, demo_lines: list[str]) -> None:
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFJsonTokenizer)
    raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.bos_id == raw.token_to_id(BOS3) and tok.eos_id == raw.token_to_id(EOS3)
    assert tok.pad_id is None
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for text in demo_lines[:50] + SAMPLES:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]  # post-processor's BOS bypassed
        assert tok.encode(text, add_bos=False) == ids[1:]
        assert tok.decode(ids + [tok.eos_id]) == text


def test_special_tokens_map_fallback(hf_dir: Path, tmp_path: Path) -> None:
    shutil.copyfile(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS3}), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is not None and tok.eos_id is None


def test_hf_json_unknown_special_token(hf_dir: Path) -> None:
    with pytest.raises(ValueError, match="<s>"):
        HFJsonTokenizer(hf_dir / "tokenizer.json", bos_token="<s>", eos_token=EOS3)


def test_load_tokenizer_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path) in message and "tokenizer.model" in message and "tokenizer.json" in message


def test_copy_tokenizer_files(hf_dir: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    shutil.copytree(hf_dir, src)
    (src / "unrelated.txt").write_text("not a tokenizer file", encoding="utf-8")
    assert copy_tokenizer_files(src, dst) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert set(TOKENIZER_FILES) >= {"tokenizer.model", "special_tokens_map.json"}


def test_train_sentencepiece_deterministic(
    demo_text_path: Path, sp_tok: SentencePieceTokenizer, tmp_path: Path
) -> None:
    # The trainer spec stored in the model records input and prefix, so retrain to the same prefix.
    first = Path(train_sentencepiece(demo_text_path, tmp_path / "tok", VOCAB_SIZE)).read_bytes()
    second = Path(train_sentencepiece(demo_text_path, tmp_path / "tok", VOCAB_SIZE)).read_bytes()
    assert first == second
    retrained = SentencePieceTokenizer(tmp_path / "tok.model")
    pieces = [retrained.id_to_piece(i) for i in range(VOCAB_SIZE)]
    assert pieces == [sp_tok.id_to_piece(i) for i in range(VOCAB_SIZE)]


def test_write_hf_tokenizer_config_rejects_hf_json(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_hf_tokenizer_config(tmp_path, load_tokenizer(hf_dir))


def test_transformers_autotokenizer_matches(
    sp_dir: Path, sp_tok: SentencePieceTokenizer, demo_lines: list[str], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    assert copy_tokenizer_files(sp_dir, tmp_path) == ["tokenizer.model"]
    write_hf_tokenizer_config(tmp_path, sp_tok)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert "LlamaTokenizer" in type(hf).__name__
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, None)
    for text in demo_lines + SAMPLES:
        ids = sp_tok.encode(text, add_bos=True)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids + [sp_tok.eos_id], skip_special_tokens=True) == sp_tok.decode(ids)
