"""ark_jax: Ark+ foundation-model pretraining in JAX/Flax."""
