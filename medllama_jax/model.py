"""The LLaMA2 decoder in Flax linen, readable top to bottom.

Every parameter and activation carries logical axis names (``embed``, ``heads``, ``mlp``, ...); which
mesh axis each maps to is decided in ``partitioning.py`` and nowhere else. Weights use Hugging Face's
rotate-half rotary layout, so importing a HF checkpoint is a rename and a reshape.

The forward pass takes per-token ``positions`` and ``segment_ids``: packed training rows restart both
per document, and left-padded prompt batches mark padding with segment 0. An optional KV cache (stacked
over layers) turns the same code into the incremental decoder used by ``decode.py``.

``Llama(config, lora=LoraConfig(...))`` adds LoRA adapters to the targeted projections (see ``lora.py``);
without ``lora`` the parameters and the computation are exactly the plain model's.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from medllama_jax import attention, lora as lora_lib
from medllama_jax.config import LlamaConfig
from medllama_jax.lora import LoraConfig

Array = jax.Array


class KVCache(NamedTuple):
  """Keys and values of every layer: ``[layers, batch, max_len, kv_heads, head_dim]``.

  ``segment_ids`` ``[batch, max_len]`` records which slots hold real tokens (0 = padding or empty) and
  ``index`` is the next slot to write (shared by the batch: prompts are left-padded to one length).
  """

  key: Array
  value: Array
  segment_ids: Array
  index: Array

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int) -> "KVCache":
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
    dtype = jnp.dtype(config.dtype)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class LayerCache(NamedTuple):
  key: Array
  value: Array


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...],
           param_dtype: Any) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)


def _dense_init(fan_in_dims: tuple[int, ...]):
  """Normal(0, 0.02)-like init scaled by fan-in, so a random model has well-behaved logits."""
  return nn.initializers.normal(stddev=1.0 / math.sqrt(math.prod(fan_in_dims)))


def contract(x: Array, w: Array, num_contracting: int = 1, **dot_kwargs: Any) -> Array:
  """``x``'s last ``num_contracting`` dimensions against ``w``'s first ones (``einsum`` semantics),
  computed as one ``[rows, k] @ [k, n]`` matrix product.

  The reshapes are free (row-major bitcasts, and merging a sharded leading dimension with unsharded
  ones keeps its sharding), but the 2-D product differentiates into 2-D products whose operands need
  no transposition: XLA's CPU backend otherwise copies activations into a transposed layout for every
  weight gradient, which made the MLP's forward and backward pass take 1.7 times as long on CPU.
  """
  k = math.prod(x.shape[x.ndim - num_contracting:])
  out_dims = w.shape[num_contracting:]
  y = jax.lax.dot(x.reshape(-1, k), w.reshape(k, -1), **dot_kwargs)
  return y.reshape(*x.shape[:x.ndim - num_contracting], *out_dims)


def _plus_lora(lora: LoraConfig | None, name: str, y: Array, x: Array, weight: Array,
               weight_axes: tuple[str, ...]) -> Array:
  """``y = x W`` plus LoRA's update of the weight ``name`` when it is a target; ``y`` itself otherwise.

  Call it inside the module that owns the weight: the adapter becomes that module's child.
  """
  if lora is None or name not in lora.targets:
    return y
  return y + lora_lib.adapter(lora, name, weight.shape, weight_axes, y.dtype)(x)


def rope_frequencies(config: LlamaConfig) -> Array:
  """Inverse frequencies ``[head_dim // 2]``, with LLaMA-3's long-context rescaling if configured."""
  head_dim = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotate-half rotary embedding of ``x`` ``[b, t, heads, d]`` at integer ``positions`` ``[b, t]``."""
  freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions; with a cache, the cache's keys are read too.

  ``prefill`` says the cache was empty before these tokens (a decoding prefill): they then attend
  among themselves, the same function as attending over the cache, but a full-sequence call that a
  fused kernel can serve.
  """

  config: LlamaConfig
  lora: LoraConfig | None = None
  prefill: bool = False

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               cache: LayerCache | None, cache_segment_ids: Array | None,
               cache_index: Array | None) -> tuple[Array, LayerCache | None]:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    q_weight_axes, kv_weight_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
    o_weight_axes = ("heads", "head_dim", "embed")
    wq = _param(self, "q_proj", _dense_init((d,)), (d, cfg.num_heads, hd), q_weight_axes, pdtype)
    wk = _param(self, "k_proj", _dense_init((d,)), (d, cfg.num_kv_heads, hd), kv_weight_axes, pdtype)
    wv = _param(self, "v_proj", _dense_init((d,)), (d, cfg.num_kv_heads, hd), kv_weight_axes, pdtype)
    wo = _param(self, "o_proj", _dense_init((cfg.num_heads, hd)), (cfg.num_heads, hd, d),
                o_weight_axes, pdtype)

    heads_axes = ("activation_batch", "activation_length", "activation_heads", None)
    kv_axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
    project = lambda name, w, axes: _plus_lora(
        self.lora, name, contract(x, w.astype(dtype)), x, w, axes)
    q = checkpoint_name(nn.with_logical_constraint(project("q_proj", wq, q_weight_axes),
                                                   heads_axes), "query_proj")
    k = checkpoint_name(nn.with_logical_constraint(project("k_proj", wk, kv_weight_axes), kv_axes),
                        "key_proj")
    v = checkpoint_name(nn.with_logical_constraint(project("v_proj", wv, kv_weight_axes), kv_axes),
                        "value_proj")
    inv_freq = rope_frequencies(cfg)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

    if cache is None:
      out = attention.attend(q, k, v, segment_ids, segment_ids, 0, cfg.attention_impl)
      new_cache = None
    else:
      new_cache = LayerCache(
          jax.lax.dynamic_update_slice_in_dim(cache.key, k.astype(cache.key.dtype), cache_index, 1),
          jax.lax.dynamic_update_slice_in_dim(cache.value, v.astype(cache.value.dtype), cache_index,
                                              1))
      if self.prefill:
        out = attention.attend(q, k, v, segment_ids, segment_ids, 0, cfg.attention_impl)
      else:
        out = attention.attend(q, new_cache.key, new_cache.value, segment_ids, cache_segment_ids,
                               cache_index, cfg.attention_impl)
    out = checkpoint_name(nn.with_logical_constraint(out, heads_axes), attention.CONTEXT_NAME)
    y = contract(out, wo.astype(dtype), 2)
    return checkpoint_name(_plus_lora(self.lora, "o_proj", y, out, wo, o_weight_axes),
                           "out_proj"), new_cache


class MLP(nn.Module):
  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size
    up_axes, down_axes = ("embed", "mlp"), ("mlp", "embed")
    gate = _param(self, "gate_proj", _dense_init((d,)), (d, f), up_axes, pdtype)
    up = _param(self, "up_proj", _dense_init((d,)), (d, f), up_axes, pdtype)
    down = _param(self, "down_proj", _dense_init((f,)), (f, d), down_axes, pdtype)
    mlp_axes = ("activation_batch", "activation_length", "activation_mlp")
    project = lambda name, inputs, w, axes: _plus_lora(self.lora, name,
                                                       contract(inputs, w.astype(dtype)), inputs, w,
                                                       axes)
    h = nn.silu(checkpoint_name(
        nn.with_logical_constraint(project("gate_proj", x, gate, up_axes), mlp_axes), "mlpwi_0"))
    h = h * checkpoint_name(nn.with_logical_constraint(project("up_proj", x, up, up_axes), mlp_axes),
                            "mlpwi_1")
    return checkpoint_name(project("down_proj", h, down, down_axes), "mlpwo")


class DecoderLayer(nn.Module):
  """Pre-norm attention and SwiGLU MLP with residuals; the body that ``nn.scan`` repeats."""

  config: LlamaConfig
  lora: LoraConfig | None = None
  prefill: bool = False

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, cache: LayerCache | None,
               cache_segment_ids: Array | None, cache_index: Array | None
               ) -> tuple[Array, LayerCache | None]:
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed_axes = ("activation_batch", "activation_length", "activation_embed")
    h, new_cache = Attention(cfg, self.lora, self.prefill, name="self_attn")(
        RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_layernorm")(x),
        positions, segment_ids, cache, cache_segment_ids, cache_index)
    x = nn.with_logical_constraint(x + h, embed_axes)
    h = MLP(cfg, self.lora, name="mlp")(
        RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x + h, embed_axes)
    return x, new_cache


# Activations named with ``checkpoint_name`` in the layer, and what each named policy keeps of them
# for the backward pass (the rest is recomputed). The names and policies are MaxText's, so a policy
# tuned there means the same here.
_QKV = ("query_proj", "key_proj", "value_proj")
_MLP_IN = ("mlpwi_0", "mlpwi_1")
_NAMED_POLICIES = {
    "minimal": (*_QKV, "out_proj", *_MLP_IN, "mlpwo"),
    "minimal_with_context": (*_QKV, "out_proj", *_MLP_IN, "mlpwo", attention.CONTEXT_NAME),
    "save_dot_with_context_except_mlp": (*_QKV, attention.CONTEXT_NAME, "out_proj"),
    "save_dot_except_mlpwi": (*_QKV, "out_proj", "mlpwo"),
    "save_dot_except_mlp": (*_QKV, "out_proj"),
    "save_qkv_proj": _QKV,
    "save_out_proj": ("out_proj",),
}
_REMAT_POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    **{name: jax.checkpoint_policies.save_only_these_names(*names)
       for name, names in _NAMED_POLICIES.items()},
}


def _layer_class(config: LlamaConfig) -> type[nn.Module]:
  if config.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[config.remat_policy],
                  prevent_cse=not config.scan_layers)


class Llama(nn.Module):
  """``tokens [b, t] -> logits [b, t, vocab]`` (float32), plus the updated cache when one is given.

  With ``lora``, the targeted projections carry unmerged adapters; their dropout is active only when
  ``apply`` gets a ``dropout`` rng (the train step passes one), so evaluation is deterministic.
  """

  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
               cache: KVCache | None = None, last_logits_only: bool = False,
               prefill: bool = False) -> tuple[Array, KVCache | None]:
    """``last_logits_only`` computes logits for the final position alone (a decoding prefill needs no
    more, and ``[batch, length, vocab]`` float32 logits of a long prompt are large). ``prefill``
    promises that ``cache`` is empty (its index 0), so the tokens attend among themselves."""
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)

    embedding = _param(self, "embed_tokens", nn.initializers.normal(1.0),
                       (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdtype)
    # FSDP gathers the model dimension of the table before the lookup (as for any weight), so the gather
    # only has to combine vocabulary shards.
    table = nn.with_logical_constraint(embedding, ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    cache_segment_ids = cache_index = None
    layer_caches = None
    if cache is not None:
      cache_index = cache.index
      cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(
          cache.segment_ids, segment_ids.astype(jnp.int32), cache_index, 1)
      layer_caches = LayerCache(cache.key, cache.value)

    layer_cls = _layer_class(cfg)
    if cfg.scan_layers:
      scanned = nn.scan(
          layer_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, new_layer_caches = scanned(cfg, self.lora, prefill, name="layers")(
          x, positions, segment_ids, layer_caches, cache_segment_ids, cache_index)
    else:
      per_layer = []
      for i in range(cfg.num_layers):
        layer_cache = None if layer_caches is None else LayerCache(layer_caches.key[i],
                                                                   layer_caches.value[i])
        x, c = layer_cls(cfg, self.lora, prefill, name=f"layers_{i}")(
            x, positions, segment_ids, layer_cache, cache_segment_ids, cache_index)
        per_layer.append(c)
      new_layer_caches = None if cache is None else LayerCache(
          jnp.stack([c.key for c in per_layer]), jnp.stack([c.value for c in per_layer]))

    if last_logits_only:
      x = x[:, -1:]
    x = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="norm")(x)
    if cfg.tie_word_embeddings:
      head = embedding.T
    else:
      head = _param(self, "lm_head", _dense_init((cfg.hidden_size,)), (cfg.hidden_size, cfg.vocab_size),
                    ("embed", "vocab"), pdtype)
    logits = contract(x, head.astype(dtype), preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                 "activation_vocab"))
    new_cache = None
    if cache is not None:
      new_cache = KVCache(new_layer_caches.key, new_layer_caches.value, cache_segment_ids,
                          cache.index + tokens.shape[1])
    return logits, new_cache
