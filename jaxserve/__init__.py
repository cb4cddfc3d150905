"""jaxserve: a JAX inference engine for large language models.

    from jaxserve import LLM, SamplingParams
    llm = LLM()                                        # SmolLM2-135M-Instruct, fetched on first use
    print(llm.generate("The capital of France is")[0].outputs[0].text)

The public names are loaded lazily, so `import jaxserve.sched` (host-only code) never imports jax.
"""

_EXPORTS = {
    "LLM": "jaxserve.llm",
    "Engine": "jaxserve.engine",
    "EngineConfig": "jaxserve.config",
    "ModelConfig": "jaxserve.config",
    "SparseAttentionConfig": "jaxserve.config",
    "SamplingParams": "jaxserve.sampling",
    "RequestOutput": "jaxserve.outputs",
    "CompletionOutput": "jaxserve.outputs",
    "Logprob": "jaxserve.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
