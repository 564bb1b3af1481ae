"""Our LLaMA forward pass against ``transformers.LlamaForCausalLM``, and against itself.

Every reference model goes through the real user path: ``save_pretrained`` → ``hf_to_orbax`` →
``loading.load_model`` on a one-device mesh → ``partitioning.make_forward``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

import helpers  # noqa: E402
from medllama_jax import loading, partitioning  # noqa: E402
from medllama_jax.config import LlamaConfig  # noqa: E402
from medllama_jax.convert import hf  # noqa: E402
from medllama_jax.model import Llama  # noqa: E402

# float32 on both sides; the only differences are summation order and transcendental implementations,
# which stay around 1e-6 of the largest logit for these 2-layer models. 1e-4 leaves headroom while any
# real mistake (wrong rotary layout, head grouping, norm, scaling) is orders of magnitude larger.
PARITY_RTOL = 1e-4
# Two of our own code paths computing the same float32 function (packing, attention back-ends).
SELF_RTOL = 1e-5
# bfloat16 activations: ~3 significant digits per op; two back-ends round at different points.
BF16_RTOL = 2e-2

SEQ_LEN = 96  # Longer than the llama3 config's original_max_position_embeddings (64).
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

CONFIGS = {
    "mha_theta5e5": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0,
                         vocab_size=320, intermediate_size=96),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "gqa8_tied_theta5e5": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                               rope_theta=500000.0),
    "head_dim32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling=LLAMA3_SCALING),
}


@dataclasses.dataclass
class Case:
  name: str
  hf_model: transformers.LlamaForCausalLM
  hf_dir: str
  orbax_dir: str
  tokens: np.ndarray
  ref_logits: np.ndarray


def _build_case(name: str, tmp_path_factory: pytest.TempPathFactory) -> Case:
  seed = sorted(CONFIGS).index(name)
  # transformers edits rope_scaling dicts in place (it adds rope_theta): hand it a copy.
  model = helpers.make_hf_model(seed=seed, **copy.deepcopy(CONFIGS[name]))
  root = tmp_path_factory.mktemp(name)
  hf_dir = helpers.save_hf_model(model, root / "hf")
  orbax_dir = str(root / "orbax")
  hf.hf_to_orbax(hf_dir, orbax_dir)
  tokens = helpers.random_tokens(model.config.vocab_size, (2, SEQ_LEN), seed=seed)
  return Case(name, model, hf_dir, orbax_dir, tokens, helpers.hf_logits(model, tokens))


@pytest.fixture(scope="module")
def build_case(tmp_path_factory):
  """``name -> Case``, each reference model built and converted once per module."""
  cache = {}

  def build(name: str) -> Case:
    if name not in cache:
      cache[name] = _build_case(name, tmp_path_factory)
    return cache[name]

  return build


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, build_case) -> Case:
  return build_case(request.param)


@pytest.fixture(scope="module")
def gqa(build_case) -> Case:
  return build_case("gqa")


@pytest.fixture(scope="module")
def mesh():
  return helpers.one_device_mesh()


@pytest.fixture(scope="module")
def load_converted(mesh):
  """``(case, scan_layers) -> LoadedModel`` from the converted folder, loaded once per module."""
  cache = {}

  def load(case: Case, scan_layers: bool):
    key = (case.orbax_dir, scan_layers)
    if key not in cache:
      cache[key] = loading.load_model(case.orbax_dir, mesh, with_tokenizer=False,
                                      scan_layers=scan_layers)
    return cache[key]

  return load


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_logits_match_transformers(case, load_converted, scan_layers):
  loaded = load_converted(case, scan_layers)
  assert loaded.config.scan_layers == scan_layers
  assert np.std(case.ref_logits) > 0.1  # The reference is not degenerate.
  ours = helpers.forward(loaded, case.tokens)
  assert helpers.rel_err(ours, case.ref_logits) <= PARITY_RTOL


def test_config_fields_survive_conversion(case):
  """The converted config.json keeps what the parity depends on (not just defaults that happen to work)."""
  config = LlamaConfig.load_hf_json(case.orbax_dir)
  hc = case.hf_model.config
  assert config.num_heads == hc.num_attention_heads
  assert config.num_kv_heads == hc.num_key_value_heads
  assert config.resolved_head_dim == hc.head_dim
  assert config.tie_word_embeddings == hc.tie_word_embeddings
  assert config.rope_theta == hc.rope_parameters["rope_theta"]
  if "rope_scaling" in CONFIGS[case.name]:
    assert config.rope_scaling_dict == LLAMA3_SCALING
  else:
    assert config.rope_scaling is None


def test_rope_scaling_changes_logits(build_case, load_converted):
  """The llama3 case is sensitive: dropping the rescaling moves the logits far beyond the tolerance."""
  c = build_case("llama3_rope")
  loaded = load_converted(c, True)
  unscaled = dataclasses.replace(loaded, config=loaded.config.replace(rope_scaling=None))
  unscaled.model = type(loaded.model)(unscaled.config)
  assert helpers.rel_err(helpers.forward(unscaled, c.tokens), c.ref_logits) > 100 * PARITY_RTOL


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_hf_folder_loads_same_params_as_converted(case, mesh, load_converted, scan_layers):
  direct = loading.load_model(case.hf_dir, mesh, with_tokenizer=False, scan_layers=scan_layers)
  converted = load_converted(case, scan_layers)
  assert direct.config == converted.config
  helpers.assert_bit_exact(helpers.host_params(direct.params), helpers.host_params(converted.params))


# ---- Packed sequences ----

SEGMENT_LENGTHS = (5, 4, 7)  # One row: segment ids 1,1,1,1,1,2,2,2,2,3,...; positions restart per segment.


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_packed_segments_match_separate_runs(gqa, mesh, scan_layers):
  loaded = loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False, scan_layers=scan_layers)
  total = sum(SEGMENT_LENGTHS)
  tokens = helpers.random_tokens(loaded.config.vocab_size, (1, total), seed=7)
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(SEGMENT_LENGTHS)])[None]
  positions = np.concatenate([np.arange(n) for n in SEGMENT_LENGTHS])[None]
  packed = helpers.forward(loaded, tokens, positions, segment_ids)

  start = 0
  for n in SEGMENT_LENGTHS:
    alone = helpers.forward(loaded, tokens[:, start:start + n])
    assert helpers.rel_err(packed[:, start:start + n], alone) <= SELF_RTOL
    # And each segment alone is what transformers computes for it.
    reference = helpers.hf_logits(gqa.hf_model, tokens[:, start:start + n])
    assert helpers.rel_err(alone, reference) <= PARITY_RTOL
    start += n


def test_packing_is_not_a_noop(gqa, mesh):
  """Without segment ids the same row gives different logits, so the test above checks the mask."""
  loaded = loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False)
  tokens = helpers.random_tokens(loaded.config.vocab_size, (1, sum(SEGMENT_LENGTHS)), seed=7)
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(SEGMENT_LENGTHS)])[None]
  positions = np.concatenate([np.arange(n) for n in SEGMENT_LENGTHS])[None]
  packed = helpers.forward(loaded, tokens, positions, segment_ids)
  unmasked = helpers.forward(loaded, tokens, positions)
  assert helpers.rel_err(unmasked, packed) > 100 * SELF_RTOL


# ---- Attention back-ends ----

ATTN_LEN = 128  # Splash attention needs a multiple of 128.


def _attention_inputs(vocab_size: int):
  tokens = helpers.random_tokens(vocab_size, (2, ATTN_LEN), seed=3)
  # Row 0: one full sequence. Row 1: three packed segments and a padded (segment 0) tail.
  lengths = (50, 30, 40)
  seg1 = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(8)])
  pos1 = np.concatenate([np.arange(n) for n in lengths] + [np.arange(8)])
  segment_ids = np.stack([np.ones(ATTN_LEN), seg1]).astype(np.int32)
  positions = np.stack([np.arange(ATTN_LEN), pos1]).astype(np.int32)
  return tokens, positions, segment_ids


@pytest.fixture(scope="module")
def xla_float32_logits(gqa, mesh):
  loaded = loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False, attention_impl="xla")
  return helpers.forward(loaded, *_attention_inputs(loaded.config.vocab_size))


def test_xla_attention_matches_transformers_on_long_rows(gqa, mesh, xla_float32_logits):
  tokens, _, _ = _attention_inputs(gqa.hf_model.config.vocab_size)
  reference = helpers.hf_logits(gqa.hf_model, tokens[:1])
  assert helpers.rel_err(xla_float32_logits[:1], reference) <= PARITY_RTOL


def _with_attention(loaded, impl):
  """The same weights run with another attention back-end (parameters do not depend on it)."""
  config = loaded.config.replace(attention_impl=impl)
  return dataclasses.replace(loaded, config=config, model=type(loaded.model)(config))


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_attention_impl_matches_xla_float32(gqa, mesh, xla_float32_logits, impl):
  # Loaded with "xla" and switched afterwards (the back-end is not part of the parameters);
  # test_load_model_with_splash_attention below covers loading with splash directly.
  loaded = _with_attention(loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False), impl)
  ours = helpers.forward(loaded, *_attention_inputs(loaded.config.vocab_size))
  # Padding slots (segment 0) see only each other; compare every real token and the padding too.
  assert helpers.rel_err(ours, xla_float32_logits) <= SELF_RTOL


def test_load_model_with_splash_attention(gqa, mesh, xla_float32_logits):
  loaded = loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False, attention_impl="splash")
  ours = helpers.forward(loaded, *_attention_inputs(loaded.config.vocab_size))
  assert helpers.rel_err(ours, xla_float32_logits) <= SELF_RTOL


def test_dot_product_matches_xla_bfloat16(gqa, mesh):
  inputs = None
  logits = {}
  for impl in ("xla", "dot_product"):
    loaded = loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False, attention_impl=impl,
                                dtype="bfloat16")
    assert loaded.config.dtype == "bfloat16"
    inputs = inputs or _attention_inputs(loaded.config.vocab_size)
    logits[impl] = helpers.forward(loaded, *inputs)
    assert logits[impl].dtype == np.float32  # Logits are always accumulated in float32.
  assert helpers.rel_err(logits["dot_product"], logits["xla"]) <= BF16_RTOL


# ---- Rematerialisation ----


def _logits_and_grads(loaded, tokens):
  positions = helpers.default_positions(tokens)
  segment_ids = np.ones_like(tokens)

  def loss(params):
    logits, _ = loaded.model.apply({"params": params}, tokens, positions, segment_ids)
    return jnp.mean(logits), logits

  with partitioning.activate(loaded.mesh, loaded.rules):
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(loaded.params)
  return np.asarray(logits), helpers.host_params(grads)


# Remat recomputes the forward pass inside the backward pass, where XLA fuses it differently: logits
# and gradients agree to float32 rounding (observed ~1e-6 relative), not bit for bit.
REMAT_RTOL = 1e-5


@pytest.mark.parametrize("scan_layers,policies", [
    (True, ("full", "dots", "minimal", "save_qkv_proj", "save_dot_with_context_except_mlp")),
    (False, ("full", "minimal_with_context", "save_dot_except_mlp", "save_dot_except_mlpwi",
             "save_out_proj"))], ids=["scan", "unrolled"])
def test_remat_policies_match_none(gqa, mesh, scan_layers, policies):
  tokens = helpers.random_tokens(gqa.hf_model.config.vocab_size, (2, 16), seed=5)
  results = {}
  for policy in ("none",) + policies:
    loaded = loading.load_model(gqa.orbax_dir, mesh, with_tokenizer=False, scan_layers=scan_layers,
                                remat_policy=policy)
    assert loaded.config.remat_policy == policy
    results[policy] = _logits_and_grads(loaded, tokens)
  ref_logits, ref_grads = results["none"]
  assert all(np.any(g != 0) for g in ref_grads.values())
  for policy in policies:
    logits, grads = results[policy]
    assert helpers.rel_err(logits, ref_logits) <= REMAT_RTOL, policy
    assert set(grads) == set(ref_grads)
    for path in ref_grads:
      assert helpers.rel_err(grads[path], ref_grads[path]) <= REMAT_RTOL, (policy, path)


# The MLP's output (``mlpwo``) only feeds the residual sum, whose backward pass does not read it, so
# no policy keeps it even where allowed; every other named activation is needed when not recomputed.
NEEDED_BY_BACKWARD = {"query_proj", "key_proj", "value_proj", "context", "out_proj", "mlpwi_0",
                      "mlpwi_1"}


@pytest.mark.parametrize("policy,saved", [
    ("full", set()),
    ("minimal", NEEDED_BY_BACKWARD - {"context"}),
    ("minimal_with_context", NEEDED_BY_BACKWARD),
    ("save_dot_with_context_except_mlp", {"query_proj", "key_proj", "value_proj", "context",
                                          "out_proj"}),
    ("save_dot_except_mlpwi", {"query_proj", "key_proj", "value_proj", "out_proj"}),
    ("save_dot_except_mlp", {"query_proj", "key_proj", "value_proj", "out_proj"}),
    ("save_qkv_proj", {"query_proj", "key_proj", "value_proj"}),
    ("save_out_proj", {"out_proj"}),
])
def test_named_remat_policies_save_what_they_name(policy, saved):
  """The backward pass keeps exactly the named activations of the policy (layers unrolled, so JAX
  reports each saved value by name), and recomputes the rest."""
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, scan_layers=False, remat_policy=policy)
  model = Llama(config)
  tokens = jnp.ones((2, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  report = io.StringIO()
  with contextlib.redirect_stdout(report):
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: jnp.sum(model.apply({"params": p}, tokens)[0]), params)
  names = re.findall(r"named '(\w+)'", report.getvalue())
  assert set(names) == saved
  assert len(names) == config.num_layers * len(saved)  # each saved name once per layer
