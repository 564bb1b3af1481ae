"""LoRA: a fresh adapter changes nothing, merging equals running unmerged, training moves only the
adapters (sharded, with optimizer state of adapter size), merge-lora's output loads and matches, and a
LoRA run checkpoints only adapters and ends with an adapter folder and a merged model folder."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

import helpers  # noqa: E402
from medllama_jax import checkpointing, loading, lora, partitioning  # noqa: E402
from medllama_jax.config import get_config  # noqa: E402
from medllama_jax.cli import convert as cli  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402
from medllama_jax.train import loop  # noqa: E402
from medllama_jax.train import optimizer as optim  # noqa: E402
from medllama_jax.train import step as train_step  # noqa: E402
from test_train_loop import in_process_gin, workspace, write_model_folder  # noqa: E402,F401

CONFIG = get_config("tiny")  # 4 heads, 2 KV heads: q and k/v adapters differ in shape.
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
RULES = partitioning.logical_axis_rules()
# float32: x (W + s A B) and x W + s (x A) B differ only by rounding; measured ~1e-6 of the largest
# logit, while the adapters themselves move the logits by tens of percent.
MERGE_RTOL = 1e-5


TOKENS = helpers.random_tokens(CONFIG.vocab_size, (2, 12))


def random_params(model, seed=0):
  """Every parameter of ``model`` (adapters included, ``B`` non-zero) drawn on the host: compiling a
  random ``init`` costs CPU seconds per model."""
  rs = np.random.RandomState(seed)
  flat = checkpointing.flatten(partitioning.unbox(partitioning.abstract_params(model)))
  return checkpointing.nest({p: (0.1 * rs.standard_normal(x.shape) + (p[-1] == "scale")).astype(
      x.dtype) for p, x in flat.items()})


def logits(model, params, tokens=TOKENS, rngs=None):
  apply = jax.jit(lambda p, t, r: model.apply({"params": p}, t, rngs=r)[0])
  return np.asarray(apply(params, tokens, rngs))


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh(2, 2, 2)


@pytest.fixture(scope="module")
def fresh_adapters(mesh):
  """``init_adapters`` of the LoRA model on the 2×2×2 mesh (one random init compiled for the module)."""
  return lora.init_adapters(Llama(CONFIG, lora=LORA), mesh, RULES, jax.random.key(1))


def test_fresh_adapters_change_nothing(fresh_adapters):
  adapters = helpers.host_params(fresh_adapters)
  for path, value in adapters.items():
    if path[-1] == "b":
      assert not np.any(value), path
    else:  # Kaiming-uniform: within ±1/sqrt(fan_in), and not degenerate.
      fan_in = np.prod(value.shape[1:-1])
      assert 0.5 < np.max(np.abs(value)) * np.sqrt(fan_in) <= 1.0, path
  base = random_params(Llama(CONFIG))
  # Both on one device: the adapters' mesh would reorder the sharded sums of the base computation.
  np.testing.assert_allclose(logits(Llama(CONFIG, lora=LORA), lora.join(base, jax.device_get(
      fresh_adapters))), logits(Llama(CONFIG), base), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_weights_equal_unmerged_adapters(scan_layers):
  config = CONFIG.replace(scan_layers=scan_layers)
  plain, adapted = Llama(config), Llama(config, lora=LORA)
  base, adapters = lora.split(random_params(adapted))
  assert checkpointing.flatten(base).keys() == checkpointing.flatten(random_params(plain)).keys()
  unmerged = logits(adapted, lora.join(base, adapters))
  assert helpers.rel_err(unmerged, logits(plain, base)) > 0.05
  merged = jax.jit(lora.merge, static_argnums=2)(base, adapters, LORA)
  assert checkpointing.flatten(merged).keys() == checkpointing.flatten(base).keys()
  assert helpers.rel_err(logits(plain, merged), unmerged) < MERGE_RTOL


def test_adapter_shapes_and_axes_follow_their_weight():
  config = CONFIG.replace(scan_layers=False)
  boxed = lora.split(partitioning.abstract_params(Llama(config, lora=LORA)))[1]
  layer = {"/".join(p[1:]): (v.value.shape, v.names) for p, v in checkpointing.flatten(boxed).items()
           if p[0] == "layers_0"}
  d, f, r = config.hidden_size, config.intermediate_size, LORA.rank
  assert layer["self_attn/q_proj_lora/a"] == ((d, r), ("embed", lora.RANK_AXIS))
  assert layer["self_attn/k_proj_lora/b"] == ((r, 2, 16), (lora.RANK_AXIS, "kv_heads", "head_dim"))
  assert layer["self_attn/o_proj_lora/a"] == ((4, 16, r), ("heads", "head_dim", lora.RANK_AXIS))
  assert layer["self_attn/o_proj_lora/b"] == ((r, d), (lora.RANK_AXIS, "embed"))
  assert layer["mlp/down_proj_lora/a"] == ((f, r), ("mlp", lora.RANK_AXIS))
  assert len(layer) == 2 * len(lora.INPUT_DIMS)
  only_q = lora.LoraConfig(rank=2, targets=["q_proj"])
  assert only_q.targets == ("q_proj",) and only_q.scale == 16.0
  with pytest.raises(ValueError, match="targets"):
    lora.LoraConfig(targets=("qkv",))


def test_dropout_only_with_a_dropout_rng():
  targets = ("q_proj", "down_proj")  # Two are enough, and random masks are slow to compile on CPU.
  without = Llama(CONFIG, lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets))
  with_dropout = Llama(CONFIG, lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=targets))
  params = random_params(without)
  deterministic = logits(without, params)
  np.testing.assert_array_equal(logits(with_dropout, params), deterministic)
  rng = {"dropout": jax.random.key(7)}
  dropped = logits(with_dropout, params, rngs=rng)
  assert helpers.rel_err(dropped, deterministic) > 1e-3
  np.testing.assert_array_equal(logits(with_dropout, params, rngs=rng), dropped)


def make_batch(rs, batch=8, length=16):
  tokens = rs.randint(3, CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)
  return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": np.ones((batch, length), np.float32),
          "decoder_segment_ids": np.ones((batch, length), np.int32),
          "decoder_positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                               (batch, length)).copy()}


def test_training_moves_only_sharded_adapters(mesh, fresh_adapters):
  model = Llama(CONFIG, lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1))
  base = jax.device_put(random_params(Llama(CONFIG)),
                        partitioning.param_shardings(Llama(CONFIG), mesh, RULES))
  base_before = helpers.host_params(base)
  adapters_before = helpers.host_params(fresh_adapters)
  opt, _ = optim.make_optimizer(total_steps=10, peak_lr=1e-2, warmup_fraction=0.0)
  shardings = train_step.train_state_shardings(model, opt, mesh, RULES)
  state = train_step.init_train_state(fresh_adapters, opt, shardings)
  step = train_step.jit_train_step(train_step.make_train_step(model, opt, num_microbatches=2),
                                   shardings, mesh, RULES, frozen=base)
  rs = np.random.RandomState(0)
  batches = [make_batch(rs) for _ in range(2)]

  losses, states = [], []
  for i in range(6):
    state, metrics = step(state, batches[i % 2])
    losses.append(float(metrics["loss"]))
    states.append(jax.device_get(state))
  assert losses[-1] < losses[0] - 0.05, losses

  # The base is untouched and outside the state; every adapter moved.
  helpers.assert_bit_exact(helpers.host_params(base), base_before)
  after = helpers.host_params(state.params)
  assert after.keys() == adapters_before.keys() and all(lora.is_adapter(p) for p in after)
  assert all(np.any(after[p] != adapters_before[p]) for p in after)

  # Adapters shard like their weight's dimensions (rank replicated), optimizer moments likewise.
  q_a = state.params["layers"]["self_attn"]["q_proj_lora"]["a"]
  q_b = state.params["layers"]["self_attn"]["q_proj_lora"]["b"]
  down_a = state.params["layers"]["mlp"]["down_proj_lora"]["a"]
  assert q_a.sharding.spec == PartitionSpec(None, "fsdp", None)
  assert q_b.sharding.spec == PartitionSpec(None, None, "tensor", None)
  assert down_a.sharding.spec == PartitionSpec(None, "tensor", None)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == q_b.shape]
  assert moments and all(m.sharding.spec == q_b.sharding.spec for m in moments)

  # Optimizer state: adapter-shaped moments and scalars, nothing of the base's size.
  adapter_shapes = {v.shape for v in after.values()}
  opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
  assert opt_shapes <= adapter_shapes | {()}
  assert not opt_shapes & {v.shape for v in base_before.values()}
  opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert opt_size < 0.2 * sum(v.size for v in base_before.values())

  # Dropout masks depend on the step only: restarting from a host copy of step 2 redoes steps 3-6
  # bit for bit.
  resumed = jax.device_put(states[1], shardings)
  for i in range(2, 6):
    resumed, _ = step(resumed, batches[i % 2])
  helpers.assert_bit_exact(helpers.host_params(resumed.params), after)


def test_merge_lora_cli_output_loads_and_matches_unmerged(tmp_path):
  mesh = helpers.one_device_mesh()
  base_dir, adapters_dir, out = (str(tmp_path / n) for n in ("base", "adapters", "merged"))
  base, adapters = lora.split(random_params(Llama(CONFIG, lora=LORA)))
  loading.save_model(base_dir, base, CONFIG, tokenizer_dir=None)
  loading.save_adapters(adapters_dir, adapters, LORA, base_model=base_dir)
  assert lora.LoraConfig.load_json(adapters_dir) == LORA
  assert lora.recorded_base_model(adapters_dir) == base_dir

  assert cli.main(["merge-lora", "--adapters", adapters_dir, "--out", out]) == 0  # base as recorded
  assert cli.main(["merge-lora", "--base", base_dir, "--adapters", adapters_dir, "--out", out]) == 1

  merged = loading.load_model(out, mesh, with_tokenizer=False)
  # Per-layer adapters from a stacked checkpoint: the layout converts like any parameter tree.
  unmerged = loading.load_model(base_dir, mesh, with_tokenizer=False, adapters=adapters_dir,
                                scan_layers=False)
  assert merged.model.lora is None and unmerged.model.lora == LORA
  assert merged.config.to_hf_dict() == CONFIG.to_hf_dict()
  expected = helpers.forward(unmerged, TOKENS)
  assert helpers.rel_err(helpers.forward(merged, TOKENS), expected) < MERGE_RTOL


def test_lora_run_saves_adapters_only_and_ends_with_adapter_and_merged_folders(in_process_gin,
                                                                                tmp_path):
  init = write_model_folder(str(tmp_path / "init"), CONFIG)
  in_process_gin(init_checkpoint=f'"{init}"', lora="@LoraConfig()", total_steps=2, save_every=1,
                 eval_every=2, eval_batches=1)
  gin.bind_parameter("LoraConfig.rank", 4)
  result = loop.train()
  run = tmp_path / "run"
  assert result.step == 2 and result.adapters_dir == str(run / "adapters")

  # Run checkpoints hold the adapters, their optimizer state and the step: no tensor of the base.
  stored = ocp.StandardCheckpointer().metadata(str(run / "checkpoints" / "2" / "state"))
  stored = stored.item_metadata.tree
  adapters = helpers.orbax_tensors(result.adapters_dir)
  assert set(checkpointing.flatten(stored["params"])) == set(adapters)
  adapter_shapes = {v.shape for v in adapters.values()}
  assert {tuple(m.shape) for m in jax.tree.leaves(stored)} <= adapter_shapes | {()}
  assert all(np.any(v) for v in adapters.values())  # B moved away from zero.

  # The adapter folder names its base; final_model is the base with the adapters merged, and exports.
  assert lora.recorded_base_model(result.adapters_dir) == init
  assert lora.LoraConfig.load_json(result.adapters_dir).rank == 4
  mesh = helpers.one_device_mesh()
  merged = loading.load_model(result.final_model_dir, mesh)
  unmerged = loading.load_model(init, mesh, with_tokenizer=False, adapters=result.adapters_dir)
  assert merged.tokenizer is not None and merged.model.lora is None
  assert helpers.rel_err(helpers.forward(merged, TOKENS), helpers.forward(unmerged, TOKENS)) < MERGE_RTOL
  hf.orbax_to_hf(result.final_model_dir, str(tmp_path / "hf"))
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")

  # Restarting the finished run restores its last checkpoint onto a freshly read base and writes the
  # same folders again.
  final = helpers.orbax_tensors(result.final_model_dir)
  again = loop.train()
  assert again.step == 2
  helpers.assert_bit_exact(helpers.orbax_tensors(again.adapters_dir), adapters)
  helpers.assert_bit_exact(helpers.orbax_tensors(again.final_model_dir), final)
