"""medllama-plan: exact bytes equal a real sharded init, compiled figures are consistent, targets parse,
fits is judged against HBM, FLOPs follow train.throughput, and the CLI prints the side-by-side table.

One CLI run compiles the tiny model's step twice (two meshes, 8 simulated devices); everything else
reuses it or needs no compile.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from medllama_jax import lora as lora_lib, partitioning  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.lora import LoraConfig  # noqa: E402
from medllama_jax.cli import plan as cli  # noqa: E402
from medllama_jax.plan import devices, planner, report  # noqa: E402
from medllama_jax.plan.memory import CompiledMemory  # noqa: E402
from medllama_jax.plan.topology import GIB, parse_target, standard_torus  # noqa: E402
from medllama_jax.train import step as train_step, throughput  # noqa: E402

RULES = partitioning.logical_axis_rules()
TRAIN = "medllama_jax.train.loop.train"
SEQUENCE, BATCH, MICRO = 16, 16, 2
TINY_BINDINGS = [f"{TRAIN}.sequence_length = {SEQUENCE}", f"{TRAIN}.global_batch_size = {BATCH}",
                 f"{TRAIN}.num_microbatches = {MICRO}", f"{TRAIN}.total_steps = 10"]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def settings(lora=None):
  return planner.TrainSettings(sequence_length=SEQUENCE, global_batch_size=BATCH,
                               num_microbatches=MICRO, total_steps=10, z_loss=0.0, lora=lora)


def on_first_device(tree, mesh):
  """Bytes that a real, sharded tree keeps on the mesh's first device."""
  first = mesh.devices.flat[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == first)


@pytest.mark.parametrize("mesh_shape,lora", [((2, 2, 2), None), ((1, 2, 4), LoraConfig(rank=4))],
                         ids=["2x2x2", "lora-1x2x4"])
def test_exact_bytes_equal_a_real_sharded_init(mesh_shape, lora):
  config = get_config("tiny")
  mesh = partitioning.make_mesh(*mesh_shape)
  inputs = planner.step_inputs(config, settings(lora), mesh, RULES)
  exact = planner.exact_bytes(inputs)
  key = jax.random.key(0)
  if lora is None:
    params = partitioning.init_params(inputs.model, mesh, RULES, key)
    assert exact["frozen"] == 0
  else:
    params = lora_lib.init_adapters(inputs.model, mesh, RULES, key)
    # The frozen base is the plain model's parameters, sharded as a plain run shards them.
    plain = planner.exact_bytes(planner.step_inputs(config, settings(), mesh, RULES))
    assert exact["frozen"] == plain["params"] > exact["params"]
  state = train_step.init_train_state(params, inputs.optimizer, inputs.state_shardings)
  assert exact["params"] == on_first_device(state.params, mesh)
  assert exact["optimizer"] == on_first_device((state.step, state.opt_state), mesh)
  # The float32 gradient accumulator is the parameters' shape (float32 here, so equal bytes).
  assert exact["gradients"] == exact["params"]
  assert exact["batch"] == 5 * BATCH * SEQUENCE * 4 // (mesh_shape[0] * mesh_shape[1])


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  """The CLI on the tiny model: two meshes that compile, one that cannot hold the 8 chips."""
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  gin.clear_config()
  argv = ["--gin_file=models/tiny.gin", *(f"--gin_bindings={b}" for b in TINY_BINDINGS),
          "--topology", "8xH100", "--mesh", "data=1,fsdp=-1,tensor=1", "--mesh", "data=4,fsdp=2",
          "--mesh", "data=3,fsdp=-1", "--remat", "full", "--json", str(out)]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(argv) == 0
  gin.clear_config()
  return json.loads(out.read_text()), printed.getvalue()


def test_compiled_memory_is_positive_and_consistent(tiny_plan):
  data, _ = tiny_plan
  fsdp8, fsdp2, bad = data["results"]
  for r in (fsdp8, fsdp2):
    assert r["error"] is None and r["remat"] == "full" and r["compiler"] == "cpu"
    c = r["compiled"]
    assert min(c["argument"], c["output"], c["alias"], c["temp"]) > 0
    # The CPU compiler's arguments are exactly the state and the batch counted from shardings.
    assert c["argument"] == r["params"] + r["optimizer"] + r["batch"]
    # Donation: the new state is written over the old one; only the metrics are new outputs.
    assert 0 < c["output"] - c["alias"] < 1024
    assert c["temp"] >= r["gradients"]
    assert r["peak"] == c["argument"] + c["output"] - c["alias"] + c["temp"] + c["code"]
  assert fsdp8["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert fsdp2["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  # More FSDP shards: fewer parameter and optimizer bytes on each device, in the compiled program too.
  assert fsdp8["params"] < fsdp2["params"] and fsdp8["optimizer"] < fsdp2["optimizer"]
  assert fsdp8["compiled"]["argument"] < fsdp2["compiled"]["argument"]
  assert bad["compiled"] is None and "devices" in bad["error"] and bad["params"] is None


def test_flops_follow_the_trainers_formula(tiny_plan):
  data, printed = tiny_plan
  config = get_config("tiny")
  expected = throughput.training_flops_per_token(config, SEQUENCE) * BATCH * SEQUENCE
  for r in data["results"]:
    assert r["model_flops_per_step"] == pytest.approx(expected, rel=1e-12)
    # Scanned layers and accumulated microbatches are loops: XLA's count is not trusted then.
    assert r["compiler_flops_per_step"] is None
  h100 = parse_target("8xH100")
  seconds = report.step_seconds(expected, h100, 0.4)
  assert seconds == pytest.approx(expected / (8 * 989e12 * 0.4), rel=1e-12)
  assert f"{BATCH * SEQUENCE / seconds:,.0f}" in printed


def test_side_by_side_table(tiny_plan):
  _, printed = tiny_plan
  lines = printed.splitlines()
  header = next(line for line in lines if line.startswith("| per device |"))
  assert "`8xH100 1x8x1 full xla`" in header and "`8xH100 4x2x1 full xla`" in header
  rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines
          if line.startswith("| ") and not line.startswith("| per device")}
  assert rows["mesh data x fsdp x tensor"][:2] == ["1 x 8 x 1", "4 x 2 x 1"]
  assert rows["remat policy"][:2] == ["full", "full"]
  assert rows["**fits**"][0].startswith("yes, ") and rows["**fits**"][1].startswith("yes, ")
  assert rows["**fits**"][2].startswith("did not compile: ValueError")
  assert rows["HBM per chip (usable, 10% reserved)"][0] == "80.00 GiB (72.00 GiB)"
  for label in ("parameters (exact)", "optimizer state (exact)", "compiled: temporaries",
                "**peak per device**", "step time at 40% MFU", "tokens/s at 40% MFU"):
    assert label in rows
  assert "frozen base model of LoRA (exact)" not in rows
  assert "Model: 0.00B parameters (2 layers, d=64" in printed
  assert "* `cpu`: XLA CPU compiler on simulated devices" in printed


def test_fits_against_a_small_hbm(tiny_plan):
  data, _ = tiny_plan
  peak = data["results"][0]["peak"]
  assert report.fit(peak, hbm_bytes=peak, reserve=0.0).fits
  assert not report.fit(peak, hbm_bytes=peak - 1, reserve=0.0).fits
  tight = report.fit(peak, hbm_bytes=peak, reserve=0.1)
  assert not tight.fits and tight.spare == int(peak * 0.9) - peak
  assert report.fit(peak, hbm_bytes=2 * peak, reserve=0.5).fits
  over = planner.PlanResult(target="v5litepod-16", mesh={"data": 1, "fsdp": 16, "tensor": 1},
                            remat="full", attention="xla", compiler="cpu",
                            model_flops_per_step=1e15, params=1, optimizer=2, frozen=0, batch=3,
                            gradients=1, compiled=CompiledMemory(argument=6, output=7, alias=6,
                                                                 temp=20 * GIB, code=0))
  table = report.comparison_table([over], settings(), reserve=0.1, mfu=0.4)
  assert "| **fits** | NO, 5.60 GiB over |" in table  # 20 GiB against 16 GiB x 0.9
  with pytest.raises(ValueError, match="reserve"):
    report.fit(peak, hbm_bytes=peak, reserve=1.0)
  with pytest.raises(ValueError, match="MFU"):
    report.step_seconds(1.0, parse_target("v4-8"), mfu=0.0)


@pytest.mark.parametrize("spec,chips,torus,name,hbm_gib", [
    ("v5p-256", 128, (4, 4, 8), "v5:4x4x8", 95), ("v5p-8", 4, (2, 2, 1), "v5:2x2x1", 95),
    ("v5p-1024", 512, (8, 8, 8), "v5:8x8x8", 95), ("v4-32", 16, (2, 2, 4), "v4:2x2x4", 32),
    ("v4-64", 32, (2, 4, 4), "v4:2x4x4", 32), ("V4-128", 64, (4, 4, 4), "v4:4x4x4", 32),
    ("v5litepod-16", 16, (4, 4), "v5e:4x4", 16), ("v5e-128", 128, (8, 16), "v5e:8x16", 16),
    ("v6e-256", 256, (16, 16), "v6e:16x16", 32), ("v5p:4x4x12", 192, (4, 4, 12), "v5:4x4x12", 95),
])
def test_tpu_slices_parse(spec, chips, torus, name, hbm_gib):
  target = parse_target(spec)
  assert (target.num_chips, target.torus, target.tpu_topology_name) == (chips, torus, name)
  assert target.chip.hbm_bytes == hbm_gib * GIB


def test_gpus_parse_and_peaks_come_from_throughput():
  h100 = parse_target("8xH100")
  assert (h100.num_chips, h100.torus, h100.chip.hbm_bytes) == (8, None, 80 * GIB)
  assert parse_target("16 x A100-80GB").chip.hbm_bytes == 80 * GIB
  assert parse_target("2xa100-40gb").chip.hbm_bytes == 40 * GIB
  assert parse_target("4xH200").chip.hbm_bytes == 141 * GIB
  table = dict(throughput.PEAK_BF16_FLOPS)
  assert parse_target("v5litepod-16").chip.peak_bf16_flops == table["TPU v5 lite"]
  assert parse_target("v5p-8").chip.peak_bf16_flops == table["TPU v5p"]
  assert parse_target("v6e-8").chip.peak_bf16_flops == table["TPU v6 lite"]
  assert parse_target("8xH200").chip.peak_bf16_flops == table["NVIDIA H200"]
  assert standard_torus(2048, 3) == (8, 16, 16) and standard_torus(1, 2) == (1, 1)


@pytest.mark.parametrize("spec,message", [
    ("v5p-255", "not a multiple"), ("v5p-384", "give the slice's shape"),
    ("v4-4", "smallest 3-D TPU slice"), ("v7-8", "unknown TPU 'v7'"), ("8xB200", "unknown GPU"),
    ("v5p:4x4", "3 positive sides"), ("0xH100", "at least 1"), ("v5litepod-0", "at least 1"),
    ("banana", "not understood"),
])
def test_bad_targets_are_refused_by_name(spec, message):
  with pytest.raises(ValueError, match=message) as e:
    parse_target(spec)
  assert repr(spec) in str(e.value)


def test_train_settings_come_from_the_recipe_with_its_macros_unset():
  cli.parse_recipe(["instruct_me_llama_70b.gin"], [f"{TRAIN}.num_microbatches = 4"], [])
  got = planner.TrainSettings.from_gin()
  assert (got.sequence_length, got.global_batch_size, got.num_microbatches) == (4096, 128, 4)
  assert got.lora == LoraConfig(rank=16, alpha=32.0, dropout=0.05) and got.z_loss == 0.0
  assert got.tokens_per_step == 128 * 4096


@pytest.mark.parametrize("extra,message", [
    (["--topology", "v5p-255"], "not a multiple"), (["--topology", "v4-8", "--mfu", "0"], "MFU"),
    (["--topology", "v4-8", "--hbm_reserve", "1"], "reserve"),
    (["--topology", "8xH100", "--compiler", "tpu"], "cannot compile for 8xH100"),
    (["--topology", "v4-8", "--mesh", "data=2,pipe=2"], "AXIS=SIZE"),
])
def test_cli_refuses_bad_arguments(extra, message, capsys):
  assert cli.main(["--gin_file=models/tiny.gin", *extra]) == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("has_libtpu", [True, False])
def test_compiler_choice(has_libtpu, monkeypatch):
  monkeypatch.setattr(devices, "libtpu_available", lambda: has_libtpu)
  v4 = parse_target("v4-8")
  assert devices.choose_compiler("auto", v4) == ("tpu" if has_libtpu else "cpu")
  assert devices.choose_compiler("cpu", v4) == "cpu"
  assert devices.choose_compiler("auto", parse_target("8xH100")) == "cpu"
  if has_libtpu:
    assert devices.choose_compiler("tpu", v4) == "tpu"
  else:
    with pytest.raises(ValueError, match="needs libtpu"):
      devices.choose_compiler("tpu", v4)


def test_cpu_devices_must_stand_for_every_chip(capsys):
  # This process has 8 simulated devices; a 16-chip target cannot be planned in it.
  assert cli.main(["--gin_file=models/tiny.gin", "--topology", "v4-32", "--compiler", "cpu"]) == 1
  assert "needs 16 CPU devices" in capsys.readouterr().err
