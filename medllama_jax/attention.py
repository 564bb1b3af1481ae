"""Attention back-ends and the mask they share.

One mask rule serves training on packed sequences and decoding with a KV cache: a query may attend to
a key when the key's slot is not after the query's slot and both carry the same segment id. Segment id 0
marks padding (left padding of a prompt batch, the tail of a packed row); such slots only see each other,
so no softmax row is ever empty. Every back-end computes the same function; they differ in speed.

The fused kernels (``splash``: Pallas splash attention, compiled by Mosaic for TPU; ``cudnn``: cuDNN
flash attention on GPU) are custom calls that XLA's SPMD partitioner cannot split, so they run inside
``shard_map`` over the active mesh: each device gets its rows (batch over the data-parallel axes) and
its heads (over the tensor axis), grouped-query heads staying with their KV head. Which mesh axes hold
which dimension comes from the logical rules (``partitioning.activation_spec``), never from names here.
The kernel is picked by the platform of the devices the program is compiled for
(``partitioning.compile_platform``): a planner on a CPU host compiling for a TPU slice gets Mosaic.
What a kernel cannot serve (a KV-cache step, a length it cannot tile, a platform without it) runs the
XLA path, with one log line saying why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec

from medllama_jax import partitioning

# A large finite negative rather than -inf: a fully masked row then gives a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Logical axes of the kernels' operands. The sequence stays whole on every shard (None): a kernel
# needs all keys of its queries' rows.
_Q_AXES = ("activation_batch", None, "activation_heads", None)
_KV_AXES = ("activation_batch", None, "activation_kv_heads", None)

# Name of the attention output (and of splash's saved residuals) for remat policies (``model.py``).
CONTEXT_NAME = "context"

Kernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


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


def causal_blocks(q_len: int) -> int:
  """How many query blocks a full causal sequence is split into: at most 8, of at least 128 slots."""
  return next((n for n in (8, 4, 2) if q_len % n == 0 and q_len // n >= 128), 1)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                             num_blocks: int) -> jax.Array:
  """``xla_attention`` of a full causal sequence, one block of queries at a time.

  Block ``i`` needs only the keys up to its last query (the rest are masked by causality), so the
  upper triangle of score blocks is never computed: with n blocks, (n + 1) / 2n of the FLOPs and of
  the score memory, and the blocks' scores need not all be live at once.
  """
  size = q.shape[1] // num_blocks
  outs = [xla_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size],
                        v[:, :(i + 1) * size], mask[:, i * size:(i + 1) * size, :(i + 1) * size])
          for i in range(num_blocks)]
  return jnp.concatenate(outs, axis=1)


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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """``jax.nn.dot_product_attention``'s XLA implementation with this module's mask."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="xla")


def splash_block_size(seq_len: int) -> int | None:
  """The splash tile for ``seq_len``: the largest of 512, 256, 128 that divides it, else None.

  The kernel tiles the sequence in blocks whose length is a multiple of the 128-lane TPU register,
  so an evenly dividing block is required; the largest one keeps the per-tile overhead lowest.
  """
  return next((block for block in (512, 256, 128) if seq_len % block == 0), None)


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
  """The causal splash kernel for ``num_heads`` query heads.

  Built inside each trace (its mask tables become constants of that program; the kernel library
  caches the mask walk itself): a kernel kept across traces would carry arrays of another trace.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  block = splash_block_size(seq_len)
  sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
  return sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret,
                                          residual_checkpoint_name=CONTEXT_NAME)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, interpret: bool = False) -> jax.Array:
  """Pallas splash attention on one device's shard: causal, with segment ids, grouped-query heads.

  The kernel takes ``[heads, t, d]`` queries and ``[kv_heads, t, d]`` keys and values (query head
  ``h`` reads KV head ``h // group``) and is mapped over the batch. ``interpret=True`` runs it through
  the Pallas interpreter (any platform: the CPU tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  b, t, num_heads, head_dim = q.shape
  kernel = _splash_kernel(num_heads, t, interpret)
  scale = head_dim ** -0.5

  def one_row(q1, k1, v1, q_seg, kv_seg):
    return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=q_seg, kv=kv_seg))

  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.vmap(one_row)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                          heads_first(v), q_segment_ids, kv_segment_ids)
  return heads_first(out).astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array) -> jax.Array:
  """cuDNN flash attention on one device's shard (``jax.nn.dot_product_attention``).

  Causality is cuDNN's own mask, so fully masked tiles are skipped; packed segments enter as a
  ``[b, 1, t, s]`` additive bias (0 within a segment, a large negative across), read tile by tile
  by the kernel: 2·t·s bytes per row in bfloat16, against the ``heads × t × s`` float32 scores the
  XLA path materialises. Grouped-query heads are native to the kernel.
  """
  return jax.nn.dot_product_attention(q, k, v, bias=segment_bias(q_segment_ids, kv_segment_ids,
                                                                 q.dtype),
                                      is_causal=True, implementation="cudnn")


def segment_bias(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, dtype) -> jax.Array:
  """``[b, 1, t, s]``: 0 where query and key share a segment, a large negative elsewhere."""
  same_segment = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  return jnp.where(same_segment, 0.0, jnp.finfo(dtype).min / 2).astype(dtype)


def _kv_heads_of_shard(k: jax.Array, v: jax.Array, head_axes: str | tuple[str, ...],
                       heads_per_shard: int, group: int) -> tuple[jax.Array, jax.Array]:
  """From all KV heads (replicated along ``head_axes``), the ones this shard's query heads read.

  The shard holds query heads ``[i·n, (i+1)·n)``, which read KV heads ``h // group``: one KV head
  when ``n`` divides the group (e.g. 70B: 8 KV heads, 16-way tensor, 4 query heads per shard), else
  one KV head per query head, gathered.
  """
  first = jax.lax.axis_index(head_axes) * heads_per_shard
  if group % heads_per_shard == 0:
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, first // group, 1, axis=2)
  else:
    index = (first + jnp.arange(heads_per_shard)) // group
    take = lambda x: jnp.take(x, index, axis=2)
  return take(k), take(v)


def run_per_shard(kernel: Kernel, q: jax.Array, k: jax.Array, v: jax.Array,
                  q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """``kernel(q, k, v, q_segment_ids, kv_segment_ids)`` on every device's shard of the active mesh.

  Batch and heads are split as the logical rules split them elsewhere in the model; the sequence is
  whole on each shard. When the KV heads do not divide over the axes that split the query heads,
  they are replicated along those axes and each shard keeps the ones its query heads read. Without a
  mesh the kernel runs on the whole arrays.
  """
  mesh = partitioning.active_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(q, k, v, q_segment_ids, kv_segment_ids)
  q_spec = partitioning.activation_spec(q.shape, _Q_AXES)
  kv_spec = partitioning.activation_spec(k.shape, _KV_AXES)
  segment_spec = PartitionSpec(q_spec[0], None)
  head_axes = q_spec[2]
  kv_replicated = head_axes is not None and kv_spec[2] is None
  heads_per_shard = q.shape[2] // partitioning.mesh_axes_size(mesh, head_axes)
  group = q.shape[2] // k.shape[2]
  if kv_replicated:
    _log_once(f"{k.shape[2]} KV heads do not divide over mesh axes {head_axes} "
              f"({partitioning.mesh_axes_size(mesh, head_axes)} shards of {q.shape[2]} query "
              "heads): KV heads are replicated along them and each shard reads its own")

  def body(q, k, v, q_segment_ids, kv_segment_ids):
    if kv_replicated:
      k, v = _kv_heads_of_shard(k, v, head_axes, heads_per_shard, group)
    return kernel(q, k, v, q_segment_ids, kv_segment_ids)

  return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec,
                                                  segment_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


_reported: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _reported:
    _reported.add(message)
    logging.info("%s", message)


def kernel_for(impl: str, q: jax.Array, k: jax.Array, q_offset: jax.Array | int,
               platform: str) -> tuple[Kernel | None, str | None]:
  """``(per-shard kernel, None)`` when ``impl`` can serve this call on ``platform``, else
  ``(None, why not)``; a cache step (which no kernel serves) and a sequence shorter than one splash
  tile (which the XLA path serves as well) come with no reason to log."""
  if not (isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]):
    return None, None
  if impl == "splash":
    if platform == "gpu":
      return None, "splash attention is a TPU kernel; on GPU the XLA path runs (or use 'cudnn')"
    if q.shape[1] < 128:  # shorter than one tile (the parameter-init trace, a short prompt)
      return None, None
    if splash_block_size(q.shape[1]) is None:
      return None, (f"splash attention cannot tile sequence length {q.shape[1]} (needs a multiple "
                    "of 128); using the XLA attention path")
    # Mosaic compiles the kernel for TPU; elsewhere (CPU tests and runs) the Pallas interpreter.
    return functools.partial(splash_attention, interpret=platform != "tpu"), None
  if impl == "cudnn":
    if platform != "gpu":
      return None, f"cuDNN attention needs a GPU (compiling for {platform}); using the XLA path"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] > 128 or q.shape[-1] % 8:
      return None, (f"cuDNN flash attention needs bfloat16/float16 and a head dimension <= 128 "
                    f"divisible by 8 (got {q.dtype}, {q.shape[-1]}); using the XLA path")
    return cudnn_attention, None
  raise ValueError(f"unknown attention kernel {impl!r}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
           kv_segment_ids: jax.Array, q_offset: jax.Array | int, impl: str) -> jax.Array:
  """Dispatches to the selected back-end; all compute the mask rule of this module.

  The kernels serve a whole sequence (queries and keys the same slots, no cache offset); anything
  else (a decoding step with a KV cache, the (1, 1) batch that parameter initialisation traces, a
  length or platform a kernel cannot serve) runs the XLA path, which computes the same function, so
  choosing a kernel never makes a model unusable somewhere.
  """
  if impl in ("splash", "cudnn"):
    kernel, why_not = kernel_for(impl, q, k, q_offset, partitioning.compile_platform())
    if kernel is not None:
      return run_per_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids)
    if why_not:
      _log_once(why_not)
    impl = "xla"
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)
  if impl == "xla":
    full_sequence = isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
    num_blocks = causal_blocks(q.shape[1]) if full_sequence else 1
    if num_blocks > 1:
      return blocked_causal_attention(q, k, v, mask, num_blocks)
    return xla_attention(q, k, v, mask)
  if impl == "dot_product":
    return dot_product_attention(q, k, v, mask)
  raise ValueError(f"unknown attention implementation {impl!r}")
