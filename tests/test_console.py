"""What a person sees of the commands: fast --help, one line per mistake, a quiet console, the log.

Commands run as a user runs them (subprocesses of the installed modules), on one CPU device.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from medllama_jax import progress
from medllama_jax.cli import console, demo

COMMANDS = ("train", "supervised", "eval", "generate", "convert", "contamination", "plan", "tpu",
            "demo")
HEAVY_MODULES = ("jax", "tensorflow", "seqio", "torch", "flax", "orbax")


def command_env(log_dir) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "JAX_PLATFORMS": "cpu", console.LOG_DIR_ENV: str(log_dir)}


def run_command(module: str, *args: str, log_dir) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"medllama_jax.cli.{module}", *args],
                        capture_output=True, text=True, timeout=300, env=command_env(log_dir))


def console_lines(result: subprocess.CompletedProcess) -> list[str]:
  """stderr less the line naming the log file (long commands print it first)."""
  return [line for line in result.stderr.splitlines() if " log file " not in line]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_imports_no_heavy_library(module, tmp_path):
  """``--help`` (and every argument check) comes before jax, TensorFlow or torch is imported."""
  probe = (f"import sys\nfrom medllama_jax.cli import {module} as command\n"
           "try:\n  command.main(['--help'])\nexcept SystemExit as e:\n  assert e.code == 0\n"
           f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env=command_env(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "usage:" in result.stdout
  assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("module,args,status,fragments", [
    ("train", ["--gin_file=gin/demo/pretrain_demo.gin", "--gin.RUN_DIR=/x"], 2,
     ["--gin.RUN_DIR=/x: not a gin value", "--gin.RUN_DIR=\"'/x'\""]),
    ("train", ["--gin_file=gin/demo/no_such_recipe.gin"], 2,
     ["gin file 'gin/demo/no_such_recipe.gin' not found"]),
    ("generate", ["--model", "MISSING", "--prompt", "hi"], 1, ["MISSING: model folder not found"]),
    ("generate", ["--model", "MISSING", "--prompt", "hi", "--mesh", "2,2,2"], 1,
     ["needs 8 devices but 1 cpu device(s) are present",
      "XLA_FLAGS=--xla_force_host_platform_device_count=8"]),
    ("eval", ["--model", "m", "--data_dir", "d", "--out", "o", "--tasks", "pubmedqa,nosuch"], 2,
     ["unknown dataset(s) nosuch", "known: all, bionli, ddi"]),
    ("generate", ["--prompt", "hi"], 2, ["the following arguments are required: --model"]),
    ("convert", ["orbax-to-hf", "--ckpt", "MISSING", "--out", "o"], 1, ["MISSING"]),
])
def test_common_mistakes_are_one_line(module, args, status, fragments, tmp_path):
  missing = str(tmp_path / "missing_model")
  args = [a.replace("MISSING", missing) for a in args]
  result = run_command(module, *args, log_dir=tmp_path / "logs")
  assert result.returncode == status, result.stderr[-2000:]
  lines = console_lines(result)
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"medllama-{module}: error: "), lines[0]
  for fragment in fragments:
    assert fragment.replace("MISSING", missing) in lines[0], lines[0]
  assert "Traceback" not in result.stderr


def test_failure_names_the_log_file_which_holds_the_traceback(tmp_path):
  result = run_command("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi",
                       log_dir=tmp_path / "logs")
  assert result.returncode == 1
  log_path = re.search(r"\(traceback: (\S+)\)$", result.stderr.strip()).group(1)
  assert log_path.startswith(str(tmp_path / "logs"))
  log = open(log_path).read()
  assert "Traceback" in log and "model folder not found" in log


def test_debug_shows_the_traceback(tmp_path):
  result = run_command("generate", "--debug", "--model", str(tmp_path / "nowhere"), "--prompt",
                       "hi", log_dir=tmp_path / "logs")
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_console_keeps_library_noise_in_the_log(tmp_path):
  """A conversion: the console shows our lines only (no C++ start-up messages, no absl-formatted
  library records); the log file gets them."""
  from helpers import make_hf_model, save_hf_model

  hf_dir = save_hf_model(make_hf_model(), tmp_path / "hf")
  result = run_command("convert", "hf-to-orbax", "--hf_dir", hf_dir, "--out",
                       str(tmp_path / "model"), log_dir=tmp_path / "logs")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == f"medllama-convert: wrote {tmp_path / 'model'}"
  absl_format = re.compile(r"^[IWEF]\d{4} ")
  for line in result.stderr.splitlines():
    assert not absl_format.match(line) and "absl::InitializeLog" not in line, line
  bar_lines = [line for line in result.stderr.splitlines() if line.startswith("reading ")]
  assert 1 <= len(bar_lines) <= 11 and bar_lines[-1].endswith(tuple("0123456789s"))
  (log_file,) = os.listdir(tmp_path / "logs")
  assert "tensors" in open(tmp_path / "logs" / log_file).read()


def test_progress_bar_logs_at_most_a_line_per_tenth(caplog, monkeypatch):
  caplog.set_level("INFO")
  clock = iter(range(0, 10_000, 11))  # 11 s per tensor: every tenth is due
  monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
  bar = progress.Bar("reading", 291, "tensors")
  for _ in range(291):
    bar.update()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reading")]
  assert len(lines) == 10
  assert lines[-1].startswith("reading: [" + "#" * 30 + "] 291/291 tensors 100%")
  # Work done within LOG_INTERVAL_S logs its end only.
  caplog.clear()
  monkeypatch.setattr(progress.time, "perf_counter", lambda: 0.0)
  quick = progress.Bar("quick", 39, "tensors")
  for _ in range(39):
    quick.update()
  assert [r.getMessage()[:6] for r in caplog.records] == ["quick:"]


def test_stage_names_what_an_error_interrupted():
  with pytest.raises(KeyboardInterrupt) as info:
    with progress.stage("outer"), progress.stage("inner"):
      raise KeyboardInterrupt()
  assert progress.interrupted_stage(info.value) == "inner"
  assert progress.format_duration(75) == "1m15s" and progress.format_duration(3725) == "1h02m"


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
  foreign = tmp_path / "thesis"
  foreign.mkdir()
  (foreign / "chapter1.tex").write_text("months of work")
  with pytest.raises(SystemExit) as info:
    demo.main(["--out", str(foreign)])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "not empty" in err and "--overwrite" in err
  assert (foreign / "chapter1.tex").read_text() == "months of work"
  # An earlier demo's folder is replaced; --overwrite replaces any folder.
  earlier = tmp_path / "demo_output"
  demo.prepare_out_dir(str(earlier), overwrite=False)
  (earlier / "old_result").write_text("x")
  demo.prepare_out_dir(str(earlier), overwrite=False)
  assert sorted(os.listdir(earlier)) == [demo.OUT_MARKER]
  demo.prepare_out_dir(str(foreign), overwrite=True)
  assert sorted(os.listdir(foreign)) == [demo.OUT_MARKER]
