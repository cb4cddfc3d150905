"""jaxserve: a JAX inference engine for large language models."""
