"""End to end through the command-line entry points: the demo, medllama-convert and medllama-generate."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from medllama_jax import decode, demo, loading, partitioning  # noqa: E402
from medllama_jax.cli import convert as convert_cli, generate as generate_cli  # noqa: E402
from medllama_jax.eval.datasets import MIBE_DATASETS  # noqa: E402
from seqio_tasks.mibe import register_mibe_tasks, task_name  # noqa: E402
from test_evaluator import expected_keys  # noqa: E402

PROMPTS = ["The patient presented with", "Aspirin"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[pathlib.Path, str]:
  """The demo run as a user runs it; its folder and what its console showed."""
  out = tmp_path_factory.mktemp("demo") / "out"
  result = subprocess.run([sys.executable, "-m", "medllama_jax.cli.demo", "--out", str(out),
                           "--max_new_tokens", "4"], capture_output=True, text=True, timeout=1800,
                          env={k: v for k, v in os.environ.items() if k != "MEDLLAMA_LOG_DIR"})
  assert result.returncode == 0, result.stderr[-5000:]
  return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo_dir(demo_run) -> pathlib.Path:
  return demo_run[0]


def test_demo_console_is_for_a_person(demo_run):
  """Each step announced when it starts, the trainer's live progress, no library noise, no line
  too long to read; the details are in the log files under OUT/logs."""
  out, console_text = demo_run
  lines = console_text.splitlines()
  starts = [next(i for i, line in enumerate(lines) if line.startswith(f"[{n}/8] "))
            for n in range(1, 9)]
  assert starts == sorted(starts)
  progress = [line for line in lines if re.search(r"step \d+/60 .* loss .* tok/s.*ETA", line)]
  assert len(progress) >= 6  # log_every 10 over 60 steps, the killed run's and the resumed run's
  assert any("resuming at step" in line for line in lines)
  assert not [line for line in lines if re.match(r"^[IWEF]\d{4} |.*absl::InitializeLog", line)]
  assert max(len(line) for line in lines) <= 240
  assert len(lines) <= 120
  logs = os.listdir(out / "logs")
  assert any(name.startswith("medllama-demo.") for name in logs)
  assert sum(name.startswith("medllama-train.") for name in logs) == 3  # killed, resumed, tuning


def test_demo_trains_resumes_exports_and_reimports(demo_dir):
  for sub in ("tokenizer/tokenizer.model", "data/pubmed_abstracts/stats.json",
              "data/mimic_cxr_reports/stats.json", "init_model/params", "run/config.gin",
              "run/operative_config.gin", "run/metrics.jsonl", "run/final_model/params",
              "run/final_model/config.json", "run/final_model/tokenizer.model",
              "hf_export/config.json", "hf_export/model.safetensors.index.json", "reimported/params"):
    assert (demo_dir / sub).exists(), sub
  losses = [json.loads(line) for line in (demo_dir / "run" / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r["loss"] for r in losses if r["split"] == "train"}
  assert max(train) == 60 and train[60] < train[10] - 1.0  # it learned
  # LoRA instruction tuning of the pre-trained model: the response loss falls.
  for sub in ("instruct_run/adapters/lora_config.json", "instruct_run/final_model/params"):
    assert (demo_dir / sub).exists(), sub
  tuning = [json.loads(line) for line in
            (demo_dir / "instruct_run" / "metrics.jsonl").read_text().splitlines()]
  response_loss = {r["step"]: r["loss"] for r in tuning if r["split"] == "train"}
  assert max(response_loss) == 40 and response_loss[40] < response_loss[10]
  hf_dir = demo_dir / "hf_export"
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ids = tok("Chest X-ray shows", return_tensors="pt").input_ids
  with torch.no_grad():
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_demo_evaluates_the_tuned_model_on_every_task(demo_dir):
  """Step 8: medllama-eval on the shipped sample of the 12 MIBE datasets and MMLU; every metric of
  every task is a finite number, except BERTScore (no encoder in the demo: None, "n/a")."""
  results = json.loads((demo_dir / "eval" / "results.json").read_text())
  # The demo ran in its own process: register the same tasks here to know their metrics.
  names = register_mibe_tasks(demo.demo_data_path("mibe"), str(demo_dir / "instruct_run" /
                                                                "final_model"),
                              datasets=[*MIBE_DATASETS, "mmlu"])
  assert names == [task_name(dataset, 0) for dataset in (*MIBE_DATASETS, "mmlu")]
  assert results["task_names"] == names
  assert results["model"] == str(demo_dir / "instruct_run" / "final_model")
  table = (demo_dir / "eval" / "results.md").read_text()
  for name in names:
    metrics = results["tasks"][name]["metrics"]
    assert set(metrics) == expected_keys(name), name
    for key, value in metrics.items():
      if key.endswith("/bert_score_f1"):
        assert value is None, key
      else:
        assert isinstance(value, float) and math.isfinite(value), (name, key, value)
    assert f"| {name} | release |" in table and f"| {name} | fixed |" in table


@pytest.mark.parametrize("source", ["reimported", "hf_export"])
def test_generate_json_matches_library(demo_dir, source, capsys):
  model_dir = str(demo_dir / source)
  argv = ["--model", model_dir, "--max_new_tokens", "6", "--json", "--mesh", "2,2,2"]
  for p in PROMPTS:
    argv += ["--prompt", p]
  assert generate_cli.main(argv) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [line["prompt"] for line in lines] == PROMPTS

  mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  loaded = loading.load_model(model_dir, mesh)
  expected = decode.generate(loaded.model, loaded.params, [loaded.tokenizer.encode(p) for p in PROMPTS],
                             decode.SamplingConfig(max_new_tokens=6),
                             eos_ids=loaded.config.eos_token_ids)
  for line, ids in zip(lines, expected):
    assert line["token_ids"] == ids
    assert line["text"] == loaded.tokenizer.decode(ids)


def test_generate_sampling_is_seeded(demo_dir, capsys):
  base = ["--model", str(demo_dir / "reimported"), "--prompt", "Aspirin", "--max_new_tokens", "8",
          "--json", "--temperature", "1.0", "--top_k", "50"]
  runs = []
  for seed in ("1", "1", "2"):
    assert generate_cli.main(base + ["--seed", seed]) == 0
    runs.append(json.loads(capsys.readouterr().out)["token_ids"])
  assert runs[0] == runs[1]
  assert runs[0] != runs[2]


def test_convert_cli_round_trip_and_errors(demo_dir, tmp_path, capsys):
  out = tmp_path / "again"
  assert convert_cli.main(["hf-to-orbax", "--hf_dir", str(demo_dir / "hf_export"), "--out", str(out),
                           "--dtype", "bfloat16"]) == 0
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert convert_cli.main(["hf-to-orbax", "--hf_dir", str(demo_dir / "hf_export"), "--out",
                           str(out)]) == 1
  assert "already exists" in capsys.readouterr().err
  assert convert_cli.main(["orbax-to-hf", "--ckpt", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "x")]) == 1
  err = capsys.readouterr().err
  assert f"{tmp_path / 'missing'}: model folder not found" in err
  assert not (tmp_path / "x").exists()


def test_model_folders_may_be_named_relative_to_the_current_directory(demo_dir, tmp_path,
                                                                      monkeypatch, capsys):
  """Orbax takes only absolute paths; every command resolves what it is given against the cwd."""
  monkeypatch.chdir(tmp_path)
  hf_export = os.path.relpath(demo_dir / "hf_export", tmp_path)
  assert convert_cli.main(["hf-to-orbax", "--hf_dir", hf_export, "--out", "model"]) == 0
  assert convert_cli.main(["orbax-to-hf", "--ckpt", "model", "--out", "exported"]) == 0
  assert (tmp_path / "exported" / "config.json").is_file()
  capsys.readouterr()
  generated = {}
  for name, folder in (("relative", "model"), ("absolute", str(tmp_path / "model"))):
    assert generate_cli.main(["--model", folder, "--prompt", PROMPTS[0], "--max_new_tokens", "4",
                              "--json"]) == 0
    generated[name] = json.loads(capsys.readouterr().out)["token_ids"]
  assert generated["relative"] == generated["absolute"] and len(generated["relative"]) == 4
  mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert loading.load_model(os.path.join("..", tmp_path.name, "model"), mesh).params


@pytest.mark.parametrize("entry_point", ["medllama_jax.cli.train", "medllama_jax.cli.eval",
                                         "medllama_jax.cli.supervised", "medllama_jax.cli.plan"])
def test_malformed_gin_flag_is_a_usage_error(entry_point, capsys):
  """Every gin-configured command reports ``--gin.NAME`` without a value before doing anything."""
  main = importlib.import_module(entry_point).main
  with pytest.raises(SystemExit) as exit_info:
    main(["--gin_file", "x.gin", "--gin.train.total_steps"])
  assert exit_info.value.code == 2
  assert "'--gin.train.total_steps': expected --gin.NAME=VALUE" in capsys.readouterr().err
