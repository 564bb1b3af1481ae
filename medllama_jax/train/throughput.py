"""Model FLOPs and per-chip peaks, for tokens/s and model FLOPs utilisation (MFU) in the train logs.

Convention (MaxText's current one, so numbers compare with published MFU): a training token costs
three forward passes (forward + backward) of

* ``2 ×`` every matmul weight (attention projections, MLP, LM head; not the embedding lookup), and
* causal attention scores and values, ``2 × 2 × seq × heads × head_dim`` per layer, counted at half
  since only the lower triangle is needed.

Peaks are dense bf16 FLOP/s per chip from the vendors' data sheets. CPUs and unknown devices have no
peak, so no MFU is reported for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medllama_jax.config import LlamaConfig

if TYPE_CHECKING:
  import jax

# device_kind prefix (as jax reports it) → dense bf16 FLOP/s per chip.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),   # v6e (Trillium)
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
)


def training_flops_per_token(config: LlamaConfig, sequence_length: int) -> float:
  """Forward + backward FLOPs per trained token (see the module docstring for what is counted)."""
  d, f, hd = config.hidden_size, config.intermediate_size, config.resolved_head_dim
  attention_weights = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads)
  matmul_weights = config.num_layers * (attention_weights + 3 * d * f) + config.vocab_size * d
  causal_attention = config.num_layers * 2 * 2 * sequence_length * config.num_heads * hd / 2
  return 3 * (2 * matmul_weights + causal_attention)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """The chip's dense bf16 peak, or None (CPU, unknown accelerator)."""
  import jax  # Here, not at the top: the planner reads the peaks table before it starts jax.

  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in PEAK_BF16_FLOPS:
    if kind.startswith(prefix):
      return flops
  return None


def mfu(config: LlamaConfig, sequence_length: int, tokens_per_second: float,
        num_devices: int, peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation of the whole mesh, or None without a known peak."""
  if not peak_per_device:
    return None
  achieved = training_flops_per_token(config, sequence_length) * tokens_per_second
  return achieved / (peak_per_device * num_devices)
