"""Checkpoint conversion between Hugging Face LLaMA weights and Flax params."""
