"""Orbax checkpoints: `convert` an HF folder or a GGUF file once, `restore` it straight onto a
mesh, each device reading only its own shard.

    jaxserve convert checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol-orbax [--dtype bfloat16]
    LLM(model="/tmp/smol-orbax", tensor_parallel_size=3)

A converted folder holds:
    jaxserve_checkpoint.json   marker: format version, dtype, source, tokenizer kind
    config.json                the HF-style config dict (`ModelConfig.from_hf` reads it)
    params/                    the model's `nnx.State` as a pure dict (`nnx.to_pure_dict`;
                               orbax, tensorstore): {"embed": {"embedding": ...}, "layers": ...}
    tokenizer                  HF source: its tokenizer.json, tokenizer_config.json, chat
                               template and generation_config.json, copied; GGUF source:
                               gguf_tokenizer.json, the tokenizer.* metadata (vocabulary, merges,
                               special ids, chat template) that `Tokenizer.from_gguf_metadata`
                               rebuilds the tokenizer from
Params are stored in the checkpoint layout (KV heads as in the model), so one checkpoint
serves any mesh; `restore` creates the model abstractly, asks orbax for each array with the
`NamedSharding` its logical axes give on the mesh (`parallel.state_shardings`), and tensorstore
reads only the slices a process's devices hold. Format 1 (before the Flax model) held a dict of
jaxserve's own parameter names; it is refused with a message to convert again.

Time until SmolLM2-135M-Instruct's float32 params are on the mesh (`python benchmarks/load.py`,
8 CPU devices on 2 cores, first run / best of 3 with the files in the page cache):
    GGUF (Q4_1, dequantized)   tp 1: 1.35 / 0.78 s   tp 3: 0.89 / 0.82 s
    safetensors (memory-mapped)       0.32 / 0.25 s         0.28 / 0.28 s
    orbax                             0.61 / 0.47 s         0.60 / 0.54 s
On one host at this size memory-mapped safetensors win; orbax reads only each host's slices
(models beyond one host) and skips GGUF dequantization. `jaxserve convert` of the GGUF: 4.7 s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.models.llama import abstract_model
from jaxserve.models.loader import LoadedCheckpoint, load_checkpoint, load_hf_config
from jaxserve.models.params import fill

MARKER = "jaxserve_checkpoint.json"
FORMAT_VERSION = 2  # 2: the Flax model's nnx.State; 1: the earlier dict-of-arrays layout
GGUF_TOKENIZER = "gguf_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                      "chat_template.json", "generation_config.json", "special_tokens_map.json")


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write an orbax checkpoint of `src` (HF folder or .gguf) to the new folder `dst`."""
    import orbax.checkpoint as ocp

    src, dst = Path(src), Path(dst).absolute()
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(dst, "destination exists and is not empty; choose a new folder")
    ckpt = load_checkpoint(src, dtype=jnp.dtype(dtype))
    hf_config, tokenizer = ckpt.hf_config, None
    if ckpt.gguf_metadata is not None:
        tokenizer = {k: v for k, v in ckpt.gguf_metadata.items() if k.startswith("tokenizer.")}
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with ocp.StandardCheckpointer() as saver:
            saver.save(dst / "params", nnx.to_pure_dict(nnx.state(ckpt.model)))
        (dst / "config.json").write_text(json.dumps(hf_config, indent=1))
        if tokenizer is not None:
            (dst / GGUF_TOKENIZER).write_text(json.dumps(tokenizer))
        else:
            for name in HF_TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
        marker = dict(format=FORMAT_VERSION, dtype=dtype, source=str(src.absolute()),
                      tokenizer="gguf" if tokenizer is not None else "hf")
        (dst / MARKER).write_text(json.dumps(marker, indent=1))  # last: the folder is complete
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # nothing half-written is left behind
        raise
    return dst


def restore(path: str | os.PathLike, mesh: jax.sharding.Mesh,
            dtype=jnp.float32) -> LoadedCheckpoint:
    """The checkpoint at `path` as (config, params placed on `mesh` in `dtype`, tokenizer
    source). Arrays are restored directly into their shardings for `mesh`."""
    import orbax.checkpoint as ocp

    from jaxserve import parallel

    path = Path(path).absolute()
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path / MARKER, f"unreadable checkpoint marker: {e}") from None
    if marker.get("format") == 1:
        raise CheckpointError(path, "this orbax checkpoint was written by an older jaxserve (format "
                                    "1, before the Flax model); re-run `jaxserve convert` on its "
                                    f"source ({marker.get('source', 'the original checkpoint')})")
    if marker.get("format") != FORMAT_VERSION:
        raise CheckpointError(path, f"orbax checkpoint format {marker.get('format')!r}; this "
                                    f"jaxserve reads format {FORMAT_VERSION}")
    hf_config = load_hf_config(path)
    config = ModelConfig.from_hf(hf_config)
    parallel.check_mesh(config, mesh)
    model = abstract_model(config, jnp.dtype(dtype))  # checkpoint layout: KV heads as stored
    state = nnx.state(model)
    target = jax.tree.map(lambda v, sh: v.replace(jax.ShapeDtypeStruct(
        v.shape, v.dtype, sharding=sh.get_value())), state, parallel.state_shardings(state, mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    with ocp.StandardCheckpointer() as loader:
        try:
            restored = loader.restore(path / "params", nnx.to_pure_dict(target))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(path / "params", f"does not match config.json: {e}") from None
    nnx.replace_by_pure_dict(target, restored)  # orbax's string layer keys are matched too
    fill(model, {path: var.get_value() for path, var in nnx.to_flat_state(target)})
    meta = None
    if marker.get("tokenizer") == "gguf":
        meta = json.loads((path / GGUF_TOKENIZER).read_text())
    return LoadedCheckpoint(model, path, meta, hf_config)

