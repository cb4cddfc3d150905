"""Configuration errors: a specific exception naming the option (or the file and key)."""

import pytest

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.errors import CheckpointError, ConfigError
from tests.conftest import TINY


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_config_json_missing_a_key_names_file_and_key(key):
    hf = {k: v for k, v in TINY.items() if k != key}
    with pytest.raises(CheckpointError, match=rf"config\.json: missing the required key '{key}'"):
        ModelConfig.from_hf(hf)
    with pytest.raises(CheckpointError, match=r"^/m/config\.json: "):
        ModelConfig.from_hf(hf, source="/m/config.json")


def test_config_json_wrong_type():
    with pytest.raises(CheckpointError, match="config.json: a value has the wrong type"):
        ModelConfig.from_hf({**TINY, "hidden_size": None})


@pytest.mark.parametrize("field,value", [
    ("max_num_seqs", 0), ("max_num_batched_tokens", -1), ("page_size", 0), ("kv_cache_memory", 0),
    ("tensor_parallel_size", 0), ("num_processes", 0), ("max_model_len", 1), ("num_kv_pages", 1),
    ("dtype", "float16"), ("decode_buckets", ()), ("max_num_seqs", True)])
def test_engine_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**{field: value})
    assert e.value.field == field and str(e.value).startswith(field)
    assert isinstance(e.value, ValueError)


def test_several_processes_need_a_coordinator():
    with pytest.raises(ConfigError, match="coordinator_address is needed when num_processes > 1"):
        EngineConfig(num_processes=2)


def test_auto_dtype_is_bfloat16_where_the_cpu_multiplies_it(monkeypatch, make_tiny_engine):
    """"auto" (the CLI's default): bfloat16 on a CPU with the bf16 dot instructions, float32 on
    one without; an engine over a loaded model keeps the model's dtype."""
    from jaxserve.config import resolve_dtype
    from jaxserve.kernels import cpu_library

    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(cpu_library, "has_bf16_dot", lambda: True)
    assert resolve_dtype("auto") == ("bfloat16" if cpu_library.available() else "float32")
    monkeypatch.setattr(cpu_library, "has_bf16_dot", lambda: False)
    assert resolve_dtype("auto") == "float32"
    assert make_tiny_engine(dtype="auto").config.dtype == "float32"  # the tiny model's
