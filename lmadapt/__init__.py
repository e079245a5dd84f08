"""lmadapt: continual training of transformer LMs in JAX."""
