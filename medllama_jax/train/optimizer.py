"""AdamW with linear warm-up and cosine decay, global-norm clipping and decoupled weight decay.

The defaults are Me-LLaMA's continual pre-training values: β1 0.9, β2 0.95, weight decay 1e-5, peak
learning rate 8e-6 with cosine decay after a warm-up of 5% of the steps. Weight decay skips the RMSNorm
scales (decaying a gain towards 0 only hurts).
"""

from __future__ import annotations

from typing import Any

import gin
import jax
import optax


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_fraction: float = 0.05,
                           end_lr_ratio: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_fraction`` of the steps, then cosine decay to
  ``end_lr_ratio * peak_lr`` at ``total_steps``."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1")
  if not 0.0 <= warmup_fraction < 1.0:
    raise ValueError(f"warmup_fraction={warmup_fraction} must be in [0, 1)")
  warmup = max(1, int(round(warmup_fraction * total_steps))) if warmup_fraction else 0
  if warmup == 0:
    return optax.cosine_decay_schedule(peak_lr, total_steps, alpha=end_lr_ratio)
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1),
                                            end_value=peak_lr * end_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for every parameter that weight decay applies to: all but the norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)


@gin.configurable
def make_optimizer(total_steps: int, peak_lr: float = 8e-6, warmup_fraction: float = 0.05,
                   end_lr_ratio: float = 0.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 1e-5, clip_norm: float | None = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its schedule (the trainer logs the learning rate from the schedule)."""
  schedule = learning_rate_schedule(peak_lr, total_steps, warmup_fraction, end_lr_ratio)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
