"""Training: optimizer, train state and the sharded train step (pre-training and instruction tuning)."""
