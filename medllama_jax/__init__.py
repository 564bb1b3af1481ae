"""medllama-jax: Me-LLaMA in JAX/Flax."""
