"""Instruction tuning data: records and loaders, chat templates, the seqio Tasks and Mixture.

Expected ids are built here from the pieces each template is documented to produce, each encoded on
its own with a tiny SentencePiece model trained on the packaged demo text, so the rendering, the
tf.data Task and ``LlamaFeatureConverter`` are all checked against the written rule, not against
each other.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import seqio
import tensorflow as tf

from medllama_jax import chat
from medllama_jax.cli import generate as generate_cli
from medllama_jax.data import instruct, records
from medllama_jax.data.feature_converter import LlamaFeatureConverter
from medllama_jax.data.pipeline import make_data_iterator
from medllama_jax.data.vocab import model_vocabulary
from medllama_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from seqio_tasks import instruct as tasks

BOS, EOS = 1, 2
FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
SYSTEM = "Answer briefly."
EXCHANGES = [("What is the dose?", "Take one tablet daily."),
             ("And for a child?", "Ask the pediatrician first."),
             ("Any side effects?", "Nausea is common.")]
SINGLE = {"id": "s1", "instruction": "Summarize the note.", "input": "Chest pain for two hours.",
          "output": "Acute chest pain."}
MULTI = {"id": "m1", "conversations": [{"from": "system", "value": SYSTEM}] + [
    {"from": role, "value": text}
    for q, a in EXCHANGES for role, text in (("human", q), ("gpt", a))]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  work = tmp_path_factory.mktemp("tok")
  text = resources.files("medllama_jax") / "demo_data" / "medical_notes.txt"
  shutil.copyfile(train_sentencepiece(str(text), work / "sp", 512), work / "tokenizer.model")
  return str(work)


@pytest.fixture(scope="module")
def sp(model_dir: str) -> Tokenizer:
  return load_tokenizer(model_dir)


def write_jsonl(path: Path, rows: list) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def expected(sp: Tokenizer, pieces: list[tuple[str, str]]
             ) -> tuple[list[int], list[float]]:
  """BOS, then each (kind, text) piece encoded alone; answers ("a") get EOS and weight 1."""
  ids, weights = [BOS], [0.0]
  for kind, text in pieces:
    piece = sp.encode(text, add_special_tokens=False) + ([EOS] if kind == "a" else [])
    ids += piece
    weights += [float(kind == "a")] * len(piece)
  return ids, weights


def medllama_pieces(exchanges, system: str | None = None) -> list[tuple[str, str]]:
  pieces = [] if system is None else [("p", system), ("t", "\n\n")]
  for user, answer in exchanges:
    pieces += [("t", "Human: \n"), ("p", user), ("t", "\n\nAssistant: \n"), ("a", answer)]
  return pieces


def task_examples(name: str, path: str, model_dir: str, length: int | None, **kwargs) -> list[dict]:
  tasks.register_instruct_task(name, path, model_dir, validation_fraction=0.0, **kwargs)
  lengths = None if length is None else {"targets": length}
  dataset = seqio.get_mixture_or_task(name).get_dataset(lengths, shuffle=False)
  return list(dataset.as_numpy_iterator())


# Records and loaders.

def test_both_record_formats_normalise_to_conversations():
  single = instruct.parse_record(SINGLE)
  assert single.turns == (instruct.Turn("user", "Summarize the note."),
                          instruct.Turn("assistant", "Acute chest pain."))
  assert (single.context, single.id, single.record_format) == (
      "Chest pain for two hours.", "s1", instruct.INSTRUCTION_FORMAT)
  assert instruct.parse_record({**SINGLE, "input": None, "context": "c"}).context == "c"
  multi = instruct.parse_record(MULTI)
  assert multi.system == SYSTEM and multi.record_format == instruct.CONVERSATIONS_FORMAT
  assert [t.role for t in multi.dialogue] == ["user", "assistant"] * 3
  agent = instruct.parse_record({"id": 7, "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "agent", "value": "a"}]})
  assert agent.id == "7" and agent.turns[1] == instruct.Turn("assistant", "a")


MALFORMED = [
    ("not json {", "bad_json"),
    (["a", "list"], "not_an_object"),
    ({"text": "no known fields"}, "unknown_format"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no_assistant_turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "human", "value": "q2"}]}, "ends_with_user_turn"),
    ({"conversations": [{"from": "doctor", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "unknown_role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, "not_alternating"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "not_alternating"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"},
                        {"from": "gpt", "value": "a"}]}, "system_not_first"),
    ({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}]},
     "empty_text"),
    ({"instruction": "q", "output": ""}, "empty_text"),
    ({"instruction": "q"}, "missing_field"),
    ({"instruction": "q", "input": "x", "context": "y", "output": "a"}, "input_and_context"),
]


def test_malformed_records_are_skipped_counted_and_located_without_text(tmp_path, caplog):
  secret = "SECRET-PATIENT-TEXT"
  rows = [SINGLE]
  for record, _ in MALFORMED:
    rows.append(record if isinstance(record, str) else json.loads(
        json.dumps(record).replace('"q"', f'"{secret}"')))
  rows.append(MULTI)
  path = write_jsonl(tmp_path / "data.jsonl", rows)
  rejections = instruct.Rejections()
  with caplog.at_level(logging.WARNING):
    read = list(instruct.read_conversations(path, rejections))
  assert [loc for loc, _ in read] == ["line 1", f"line {len(rows)}"]
  want: dict[str, int] = {}
  for _, reason in MALFORMED:
    want[reason] = want.get(reason, 0) + 1
  assert dict(rejections.counts) == want and rejections.total == len(MALFORMED)
  for line, (_, reason) in enumerate(MALFORMED, start=2):
    assert f"{path} line {line}: {reason}" in caplog.text
  assert secret not in caplog.text and "only a question" not in caplog.text


def test_jsonl_json_and_parquet_loaders_agree(tmp_path):
  records = [SINGLE, MULTI, {"conversations": []}]
  jsonl = write_jsonl(tmp_path / "a.jsonl", [SINGLE, "", MULTI, {"conversations": []}])
  (tmp_path / "a.json").write_text(json.dumps(records))
  want = [instruct.parse_record(SINGLE), instruct.parse_record(MULTI)]
  runs = {"jsonl": (jsonl, ["line 1", "line 3"]), "json": (str(tmp_path / "a.json"),
                                                         ["index 0", "index 1"])}
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  # A Parquet file has every column in every row; absent fields are nulls.
  columns = sorted({k for r in records for k in r})
  pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records]),
                 tmp_path / "a.parquet")
  runs["parquet"] = (str(tmp_path / "a.parquet"), ["row 0", "row 1"])
  for suffix, (path, locations) in runs.items():
    rejections = instruct.Rejections()
    read = list(instruct.read_conversations(path, rejections))
    assert [c for _, c in read] == want, suffix
    assert [loc for loc, _ in read] == locations, suffix
    assert dict(rejections.counts) == {"no_user_turn": 1}, suffix


def test_whole_file_errors_raise(tmp_path):
  (tmp_path / "d.json").write_text('{"instruction": "q", "output": "a"}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    list(instruct.read_conversations(str(tmp_path / "d.json")))
  with pytest.raises(ValueError, match="must be one of"):
    list(instruct.read_conversations(str(tmp_path / "d.csv")))
  with pytest.raises(FileNotFoundError, match="no instruction data file"):
    list(instruct.read_conversations(str(tmp_path / "missing.jsonl")))


# Templates and rendering.

def prompt_text(conversation: instruct.Conversation, template: str | chat.ChatTemplate) -> str:
  return "".join(s.text for s in chat.segments(conversation, template))


def test_templates_reproduce_the_published_strings():
  question = instruct.Conversation((instruct.Turn("user", "Is aspirin safe?"),))
  with_context = instruct.Conversation(question.turns, context="Patient on warfarin.")
  published = "Human: \nIs aspirin safe?\n\nAssistant: \n"
  assert prompt_text(question, "release_human_assistant") == published
  assert prompt_text(question, "medllama") == published
  alpaca = ("Below is an input that describes a task, maybe paired with a context that provides "
            "further information. Write a response that appropriately completes the request.\n"
            "INPUT: {text} \nCONTEXT: {context}\nOUTPUT:")
  assert prompt_text(with_context, "alpaca_medinstruct") == alpaca.format(
      text="Is aspirin safe?", context="Patient on warfarin.")
  assert prompt_text(question, "alpaca_medinstruct") == alpaca.format(text="Is aspirin safe?",
                                                                      context="")
  hcm = ("Given a medical query, provide a concise and clear answer based on the patient's "
         "description.\nINPUT: {text}\nOUTPUT:")
  assert prompt_text(question, "healthcaremagic") == hcm.format(text="Is aspirin safe?")
  nested = chat.TEMPLATES["medllama"].wrap(chat.TEMPLATES["healthcaremagic"])
  assert prompt_text(question, nested) == published.replace(
      "Is aspirin safe?", hcm.format(text="Is aspirin safe?"))
  # Without a {context} slot the context follows the text after a blank line.
  assert prompt_text(with_context, "medllama") == (
      "Human: \nIs aspirin safe?\n\nPatient on warfarin.\n\nAssistant: \n")


def test_templates_refuse_what_they_cannot_hold():
  multi = instruct.parse_record(MULTI)
  with pytest.raises(instruct.InvalidConversation, match="template_has_no_system_turn"):
    chat.segments(multi, "release_human_assistant")
  no_system = instruct.Conversation(multi.dialogue)
  with pytest.raises(instruct.InvalidConversation, match="template_is_single_turn"):
    chat.segments(no_system, "healthcaremagic")
  with pytest.raises(ValueError, match="unknown chat template"):
    chat.segments(no_system, "vicuna")


def test_render_weights_answers_and_their_eos_only(sp, model_dir):
  single = instruct.parse_record(SINGLE)
  ids, weights = chat.render(single, sp, "medllama")
  assert (ids, weights) == expected(sp, [("t", "Human: \n"), ("p", "Summarize the note."),
                                         ("t", "\n\n"), ("p", "Chest pain for two hours."),
                                         ("t", "\n\nAssistant: \n"), ("a", "Acute chest pain.")])
  multi = instruct.parse_record(MULTI)
  ids, weights = chat.render(multi, sp)
  assert (ids, weights) == expected(sp, medllama_pieces(EXCHANGES, SYSTEM))
  assert sorted(set(weights)) == [0.0, 1.0] and ids.count(EOS) == len(EXCHANGES)
  # A seqio vocabulary renders the same ids as the Tokenizer.
  assert chat.render(multi, model_vocabulary(model_dir)) == (ids, weights)


def test_render_prompt_round_trip_on_the_demo_sample(sp):
  for _, conversation in instruct.read_conversations(tasks.demo_sample_path()):
    for template in ("medllama", "release_human_assistant"):
      try:
        ids, weights = chat.render(conversation, sp, template)
      except instruct.InvalidConversation:
        assert template == "release_human_assistant"
        continue
      prompt = chat.render_prompt(instruct.Conversation(conversation.turns[:-1],
                                                        conversation.context), sp, template)
      answer = sp.encode(conversation.turns[-1].text, add_special_tokens=False) + [EOS]
      assert ids == prompt + answer
      assert weights[len(prompt):] == [1.0] * len(answer)
      assert weights[:len(prompt)].count(1.0) == (len(conversation.dialogue) // 2 - 1) + sum(
          len(sp.encode(t.text, add_special_tokens=False)) for t in conversation.dialogue[1:-1:2])
  with pytest.raises(ValueError, match="ends with a user turn"):
    chat.render_prompt(conversation, sp)


def test_generate_cli_chat_prompt_is_render_prompt(sp):
  question = "What is the dose?"
  one_turn = instruct.Conversation((instruct.Turn("user", question),))
  for template in chat.TEMPLATES:
    assert generate_cli.encode_prompt(sp, question, template) == chat.render_prompt(
        one_turn, sp, template)
  assert generate_cli.encode_prompt(sp, question) == sp.encode(question)
  args = generate_cli.build_parser().parse_args(
      ["--model", "m", "--prompt", question, "--chat", "--chat_template", "healthcaremagic"])
  assert args.chat and args.chat_template == "healthcaremagic"
  args = generate_cli.build_parser().parse_args(["--model", "m", "--prompt", "p"])
  assert not args.chat and args.chat_template == chat.DEFAULT_TEMPLATE


# seqio Tasks: rendering, packing, truncation.

def convert(name: str, length: int, pack: bool) -> list[dict[str, np.ndarray]]:
  dataset = seqio.get_dataset(name, {"targets": length}, LlamaFeatureConverter(pack=pack),
                              shuffle=False, num_epochs=1)
  return list(dataset.as_numpy_iterator())


def shifted_row(ids: list[int], weights: list[float], length: int) -> dict[str, np.ndarray]:
  pad = length - (len(ids) - 1)
  return {"decoder_input_tokens": ids[:-1] + [0] * pad,
          "decoder_target_tokens": ids[1:] + [0] * pad,
          "decoder_loss_weights": weights[1:] + [0.0] * pad,
          "decoder_segment_ids": [1] * (len(ids) - 1) + [0] * pad,
          "decoder_positions": list(range(len(ids) - 1)) + [0] * pad}


def test_task_rows_unpacked_and_packed_have_exact_loss_weights(tmp_path, sp, model_dir):
  path = write_jsonl(tmp_path / "two.jsonl", [SINGLE, MULTI])
  single = expected(sp, [("t", "Human: \nBelow is an input that describes a task, maybe paired "
                               "with a context that provides further information. Write a response "
                               "that appropriately completes the request.\nINPUT: "),
                         ("p", "Summarize the note."), ("t", " \nCONTEXT: "),
                         ("p", "Chest pain for two hours."), ("t", "\nOUTPUT:\n\nAssistant: \n"),
                         ("a", "Acute chest pain.")])
  multi = expected(sp, medllama_pieces(EXCHANGES, SYSTEM))
  tasks.register_instruct_task("instruct_test_two", path, model_dir,
                               prompt_format="alpaca_medinstruct", validation_fraction=0.0)
  length = len(single[0]) + len(multi[0])
  unpacked = convert("instruct_test_two", length, pack=False)
  packed = convert("instruct_test_two", length, pack=True)
  want = [shifted_row(*single, length), shifted_row(*multi, length)]
  # Both examples fill one row: the second's rows follow the first's, segment 2, positions from 0.
  n = len(single[0]) - 1
  both = {k: want[0][k][:n] + want[1][k][:length - n] for k in FEATURES}
  both["decoder_segment_ids"] = [1] * n + [2] * (len(multi[0]) - 1) + [0] * 2
  for rows, wanted in ((unpacked, want), (packed, [both])):
    assert len(rows) == len(wanted)
    for row, w in zip(rows, wanted):
      for k in FEATURES:
        np.testing.assert_array_equal(row[k], np.asarray(w[k], row[k].dtype), err_msg=k)


def test_truncation_drops_turns_then_prompt_then_answer_tail(tmp_path, sp, model_dir):
  conversation = instruct.parse_record(MULTI)
  tokens, kinds, exchanges = [BOS], [chat.Kind.TEMPLATE], [0]
  for segment in chat.segments(conversation):
    ids = sp.encode(segment.text, add_special_tokens=False)
    ids += [EOS] if segment.kind == chat.Kind.ANSWER else []
    tokens += ids
    kinds += [segment.kind] * len(ids)
    exchanges += [segment.exchange] * len(ids)
  full, _ = expected(sp, medllama_pieces(EXCHANGES, SYSTEM))
  assert tokens == full
  last_two, _ = expected(sp, medllama_pieces(EXCHANGES[1:], SYSTEM))
  last_only, _ = expected(sp, medllama_pieces(EXCHANGES[2:], SYSTEM))
  answer = sp.encode(EXCHANGES[2][1], add_special_tokens=False) + [EOS]
  prompt_ids = sum(len(sp.encode(text, add_special_tokens=False)) for text in (SYSTEM, EXCHANGES[2][0]))
  template_ids = len(last_only) - prompt_ids - len(answer)  # BOS and template text
  assert prompt_ids > 3 and len(answer) > 3

  def run(length: int) -> tuple[list[int], str]:
    kept, kept_kinds, code = tasks.truncate(tf.constant(tokens), tf.constant(kinds, tf.int32),
                                            tf.constant(exchanges), length)
    assert len(kept) <= length and len(kept_kinds) == len(kept)
    return kept.numpy().tolist(), tasks.TRUNCATION_CODES[int(code)]

  assert run(len(full)) == (full, "none")
  # One token short: the first exchange goes, the system turn and the rest stay.
  assert run(len(full) - 1) == (last_two, "turns_dropped")
  # The last exchange alone, 3 tokens over: the prompt text (system first) loses its first 3 tokens.
  assert run(len(last_only) - 3) == (last_only[:1] + last_only[4:], "prompt_cut")
  # No room for any prompt text: BOS, template text and the whole answer remain.
  ids, code = run(template_ids + len(answer))
  assert code == "prompt_cut" and len(ids) == template_ids + len(answer)
  assert ids[-len(answer):] == answer
  # Through the Task, shorter still: the answer loses its tail, EOS first; counted, weights still 1.
  path = write_jsonl(tmp_path / "long.jsonl", [MULTI])
  before = tasks.TRUNCATIONS["instruct_test_long", "answer_cut"]
  (example,) = task_examples("instruct_test_long", path, model_dir, template_ids + 3)
  assert example["targets"].tolist() == ids[:template_ids] + answer[:3]
  assert example["loss_weights"].tolist() == [0.0] * template_ids + [1.0] * 3
  assert tasks.TRUNCATION_CODES[example["truncation"]] == "answer_cut"
  assert tasks.TRUNCATIONS["instruct_test_long", "answer_cut"] == before + 1


def test_task_skips_records_the_template_cannot_hold_and_splits_by_id(tmp_path, model_dir, caplog):
  path = write_jsonl(tmp_path / "mixed.jsonl", [SINGLE, MULTI, {"instruction": "q"}])
  with caplog.at_level(logging.WARNING):
    examples = task_examples("instruct_test_single_turn", path, model_dir, 64,
                             template="release_human_assistant")
  assert [e["id"] for e in examples] == [b"s1"]
  assert "line 2: template_has_no_system_turn" in caplog.text
  assert "line 3: missing_field" in caplog.text
  many = [{"id": f"r{i}", "instruction": "q", "output": "a"} for i in range(40)]
  path = write_jsonl(tmp_path / "many.jsonl", many)
  tasks.register_instruct_task("instruct_test_split", path, model_dir, validation_fraction=0.25)
  task = seqio.get_mixture_or_task("instruct_test_split")
  ids = {split: {e["id"].decode() for e in task.get_dataset({"targets": 32}, split=split,
                                                           shuffle=False).as_numpy_iterator()}
         for split in ("train", "validation")}
  assert ids["train"].isdisjoint(ids["validation"]) and len(ids["train"] | ids["validation"]) == 40
  assert ids["validation"] and ids["validation"] == {
      r["id"] for r in many if records.split_of(r["id"], 0.25) == "validation"}


# The Mixture.

def test_mixture_rates_follow_the_sample_counts(tmp_path, model_dir):
  for source in tasks.SOURCES:
    shutil.copyfile(tasks.demo_sample_path(), tmp_path / f"{source}.jsonl")
  name = tasks.register_instruct_mixture(str(tmp_path), model_dir)
  mixture = seqio.get_mixture_or_task(name)
  rates = {t.name.removeprefix(f"{name}_"): mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {s: float(source.samples) for s, source in tasks.SOURCES.items()}
  assert sum(rates.values()) == 219_484
  assert rates["medinstruct"] / rates["liveqa"] == pytest.approx(52_000 / 634)


def test_mixture_missing_file_and_left_out_sources(tmp_path, model_dir):
  missing = "general_conversation"  # the first source
  with pytest.raises(FileNotFoundError, match=rf"'{missing}'.*rates=\{{'{missing}': 0\}}"):
    tasks.register_instruct_mixture(str(tmp_path), model_dir)
  shutil.copyfile(tasks.demo_sample_path(), tmp_path / "medinstruct.jsonl")
  (tmp_path / "qa").mkdir()
  shutil.copyfile(tasks.demo_sample_path(), tmp_path / "qa" / "health.jsonl")
  rates = {s: 0 for s in tasks.SOURCES}
  rates.update(medinstruct=52_000, healthcaremagic_icliniq=20_000)
  name = tasks.register_instruct_mixture(
      str(tmp_path), model_dir, rates=rates, mixture_name="instruct_test_mix",
      source_files={"healthcaremagic_icliniq": "qa/health.jsonl"}, validation_fraction=0.0)
  assert {t.name for t in seqio.get_mixture_or_task(name).tasks} == {
      "instruct_test_mix_medinstruct", "instruct_test_mix_healthcaremagic_icliniq"}
  # Loss weights survive mixing: prompts weigh 0, answers 1. Rows of 64 tokens truncate most
  # examples (the truncation logging runs inside the pipeline), and the data position is saved and
  # restored.
  def iterator():
    return make_data_iterator(name, 64, 4, shard_index=0, num_shards=1, pack=False)

  data = iterator()
  batch = next(data)
  weights, segments = batch["decoder_loss_weights"], batch["decoder_segment_ids"]
  assert set(np.unique(weights)) == {0.0, 1.0}
  assert ((segments > 0) & (weights == 0)).any() and not ((segments == 0) & (weights > 0)).any()
  data.save(str(tmp_path / "position"))
  after = [next(data) for _ in range(2)]
  restored = iterator()
  restored.restore(str(tmp_path / "position"))
  for want, got in zip(after, [next(restored) for _ in range(2)]):
    for k in FEATURES:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(ValueError, match="unknown instruction sources"):
    tasks.source_rates({"pubmedqa": 1})
