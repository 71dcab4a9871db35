"""bipft-jax: BiPFT, the Binary Pre-trained Foundation Transformer, in JAX/Flax."""
__version__ = "0.1.0"
