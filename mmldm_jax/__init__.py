"""mmldm_jax: a JAX/Flax reimplementation of MM-LDM for sounding-video generation."""
__version__ = "0.1.0"
