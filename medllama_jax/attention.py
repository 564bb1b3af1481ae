"""Attention back-ends and the mask they share.

One mask rule serves training on packed sequences and decoding with a KV cache: a query may attend to
a key when the key's slot is not after the query's slot and both carry the same segment id. Segment id 0
marks padding (left padding of a prompt batch, the tail of a packed row); such slots only see each other,
so no softmax row is ever empty. Every back-end computes the same function; they differ in speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

# A large finite negative rather than -inf: a fully masked row then gives a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   q_offset: jax.Array | int = 0) -> jax.Array:
  """Boolean ``[batch, q_len, kv_len]`` mask: causal by slot, and within the same segment.

  ``q_offset`` is the slot of the first query (the KV-cache write index when decoding; 0 otherwise).
  """
  q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  q_slot = q_offset + jnp.arange(q_len, dtype=jnp.int32)
  kv_slot = jnp.arange(kv_len, dtype=jnp.int32)
  causal = kv_slot[None, :] <= q_slot[:, None]
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return causal[None] & same_segment


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention with plain einsums; softmax in float32.

  Shapes: q ``[b, t, heads, d]``; k, v ``[b, s, kv_heads, d]``; mask ``[b, t, s]``.
  """
  b, t, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  q = q.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, num_heads, head_dim)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention``; ``implementation="cudnn"`` selects cuDNN flash attention on GPU."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                      implementation=implementation)


def splash_block_size(seq_len: int) -> int | None:
  """The splash tile for ``seq_len``: the largest of 512, 256, 128 that divides it, else None.

  The kernel tiles the sequence in blocks whose length is a multiple of the 128-lane TPU register,
  so an evenly dividing block is required; the largest one keeps the per-tile overhead lowest.
  """
  return next((block for block in (512, 256, 128) if seq_len % block == 0), None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, interpret: bool = False) -> jax.Array:
  """Pallas splash attention (TPU): causal with segment ids, without a cache offset.

  ``interpret=True`` runs the kernel through the Pallas interpreter, so CPU tests check it matches.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, t, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  block = splash_block_size(t)
  if block is None:
    raise ValueError(f"splash attention needs a sequence length divisible by 128; got {t}")
  sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
  kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
  scale = head_dim ** -0.5

  def one_example(q1, k1, v1, q_seg, kv_seg):
    # q1 [kv_heads, group, t, d]; k1, v1 [kv_heads, t, d]: one MQA kernel call per kv head.
    segments = sk.SegmentIds(q=q_seg, kv=kv_seg)
    return jax.vmap(functools.partial(kernel, segment_ids=segments))(q1 * scale, k1, v1)

  qh = q.reshape(b, t, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = jax.vmap(one_example)(qh, kh, vh, q_segment_ids, kv_segment_ids)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, num_heads, head_dim).astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
           kv_segment_ids: jax.Array, q_offset: jax.Array | int, impl: str) -> jax.Array:
  """Dispatches to the selected back-end; all compute the mask rule of this module.

  Splash only covers what its kernel can tile: a full (not cached) sequence whose length a splash
  block divides. Anything else (decoding with a KV cache, which needs a query offset; the (1, 1)
  batch that parameter initialisation traces; a ragged length) runs the XLA path, which computes the
  same function, so choosing splash never makes a model unusable at some length.
  """
  if impl == "splash":
    full_sequence = isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
    if full_sequence and splash_block_size(q.shape[1]) is not None:
      return splash_attention(q, k, v, q_segment_ids, kv_segment_ids,
                              interpret=jax.default_backend() != "tpu")
    if full_sequence:  # A cache offset is splash's documented limit; a length is worth a note.
      logging.info("splash attention cannot tile sequence length %d (needs a multiple of 128); "
                   "using the XLA attention path", q.shape[1])
    impl = "xla"
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)
  if impl == "xla":
    return xla_attention(q, k, v, mask)
  if impl == "dot_product":
    return dot_product_attention(q, k, v, mask)
  if impl == "cudnn":
    return dot_product_attention(q, k, v, mask, implementation="cudnn")
  raise ValueError(f"unknown attention implementation {impl!r}")
