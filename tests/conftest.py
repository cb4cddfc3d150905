"""Shared fixtures: the real default model (fetched once into checkpoints/ by its real fetch
path) and tiny random-weight engines that compile in seconds."""

import dataclasses
import os

# 8 CPU devices for the sharded tests (tests/test_parallel.py); set before jax starts. Programs
# of the single-device tests still run on device 0 alone: measured, tests/test_runner.py,
# test_engine.py and test_models.py take 113 s with the flag and 121 s without.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine
from jaxserve.models.llama import init_model


_BACKEND_COMPILES = [0]


def _on_event(event: str, duration: float, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[0] += 1


# Every XLA compile in the process, not only the runner's own programs (a stray jnp op on the
# host path compiles too): tests read it through `backend_compiles`.
jax.monitoring.register_event_duration_secs_listener(_on_event)


@pytest.fixture
def backend_compiles():
    """A function returning the number of XLA backend compiles so far in this process."""
    return lambda: _BACKEND_COMPILES[0]


@pytest.fixture(scope="session")
def default_model_path():
    from jaxserve.models.fetch import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_checkpoint(default_model_path):
    from jaxserve.models.loader import load_checkpoint

    return load_checkpoint(default_model_path, dtype=jnp.float32)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_checkpoint):
    from jaxserve.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smol_checkpoint.gguf_metadata)


TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024,
            tie_word_embeddings=True)
# The host prefix tier is off in tiny engines unless a test turns it on (test_host_tier.py):
# its copy programs compile per cache size, ~9 s of a tiny engine's start for each new size.
TINY_ENGINE = EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                           decode_buckets=(1, 2, 4, 8), num_kv_pages=128, page_size=8,
                           host_prefix_cache=False)


@pytest.fixture(scope="session")
def tiny_model():
    config = ModelConfig.from_hf(TINY)
    # Larger than init's default scale so that greedy outputs vary from token to token.
    return init_model(config, jax.random.PRNGKey(0), jnp.float32, scale=0.5)


@pytest.fixture(scope="session")
def make_tiny_engine(tiny_model, smol_tokenizer):
    """tiny engine factory: a 2-layer random model behind SmolLM2's real tokenizer."""

    def make(model=None, **overrides):
        config = dataclasses.replace(TINY_ENGINE, **overrides)
        return Engine.from_components(config, tiny_model if model is None else model, smol_tokenizer)

    return make
