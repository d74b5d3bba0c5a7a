"""jaxdistill: multi-teacher knowledge distillation in JAX/Flax NNX."""
