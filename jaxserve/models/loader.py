"""Loading checkpoints: HF safetensors folders (single or sharded) and GGUF files.

Both paths end in the same place: a `ModelConfig` from an HF-style config dict, and HF-named
float tensors handed to `params.model_from_hf`, which checks every shape against the config and
fills an abstractly created Flax model, each array placed straight into its sharding.

The safetensors reader is our own (a JSON header and raw little-endian data, memory-mapped) so
that every header field is bounded against the file size before anything is read, and BF16
loads through ml_dtypes without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError
from jaxserve.models.llama import LlamaModel
from jaxserve.models.params import model_from_hf

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


@dataclasses.dataclass
class LoadedCheckpoint:
    model: LlamaModel
    source: Path
    gguf_metadata: dict | None = None  # GGUF key/values (tokenizer, chat template), GGUF only
    hf_config: dict | None = None  # the config.json-style dict `config` was built from

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries by name, byte offset of the data section), validated against file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(path, f"truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(path, f"corrupt safetensors header: claims {n} header bytes in a "
                                        f"{size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(path, f"corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = _ST_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt safetensors entry for {name!r}: {entry!r}") from None
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not 0 <= start <= end or end - start != expected:
            raise CheckpointError(path, f"tensor {name!r}: data offsets {start}..{end} do not match "
                                        f"shape {shape} of {entry['dtype']}")
        if end > data_size:
            raise CheckpointError(path, f"truncated: tensor {name!r} ends at byte {end} of the data "
                                        f"section but the file holds only {data_size}")
    return header, 8 + n


class SafetensorsFolder:
    """HF-named tensors across one or many safetensors shards of a folder."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(index, f"corrupt index ({e})") from None
            files = sorted(set(weight_map.values()))
            outside = [f for f in files if not isinstance(f, str) or
                       not (folder / f).resolve().is_relative_to(folder.resolve())]
            if outside:
                raise CheckpointError(index, f"weight_map names shard files outside the checkpoint "
                                             f"folder: {outside[:3]}")
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(folder, "no *.safetensors files in the checkpoint folder")
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise CheckpointError(path, "missing shard listed in model.safetensors.index.json")
            header, base = read_safetensors_header(path)
            for tensor, entry in header.items():
                self.where[tensor] = (path, entry, base)
        self._maps: dict[Path, np.memmap] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(next(iter(self.where.values()))[0].parent if self.where else "?",
                                  f"tensor {name!r} is missing from the checkpoint")
        path, entry, base = self.where[name]
        if tuple(entry["shape"]) != tuple(shape):
            raise CheckpointError(path, f"tensor {name!r} has shape {tuple(entry['shape'])}, "
                                        f"the config implies {tuple(shape)}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        start, end = entry["data_offsets"]
        raw = self._maps[path][base + start: base + end]
        return raw.view(_ST_DTYPES[entry["dtype"]]).reshape(shape).astype(np.float32)


def load_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(path, "missing config.json in the checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"config.json is not valid JSON ({e})") from None


def _check_mesh(config: ModelConfig, mesh) -> None:
    """Refuse a mesh the model cannot run on before any weight is read."""
    if mesh is not None:
        from jaxserve.parallel import check_mesh

        check_mesh(config, mesh)


def load_checkpoint(path: str | os.PathLike, dtype=jnp.float32, mesh=None) -> LoadedCheckpoint:
    """Load an HF safetensors folder or a `.gguf` file as a model in `dtype`, each parameter
    placed at its sharding on `mesh` (default: the first device)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_file() and path.suffix == ".gguf":
        from jaxserve.models.gguf import read_gguf

        source = f"{path} (metadata)"
        g = read_gguf(path, check_config=lambda hf: _check_mesh(
            ModelConfig.from_hf(hf, source=source), mesh))
        config = ModelConfig.from_hf(g.hf_config, source=source)

        def get(name, shape):
            if name not in g.tensors:
                raise CheckpointError(path, f"tensor {name!r} is missing from the GGUF file")
            if g.tensors[name].shape != tuple(shape):
                raise CheckpointError(path, f"tensor {name!r} has shape {g.tensors[name].shape}, "
                                            f"the config implies {tuple(shape)}")
            return g.tensors[name]

        return LoadedCheckpoint(model_from_hf(config, get, dtype, mesh), path, g.metadata,
                                g.hf_config)
    if path.is_dir():
        hf_config = load_hf_config(path)
        config = ModelConfig.from_hf(hf_config, source=str(path / "config.json"))
        _check_mesh(config, mesh)
        folder = SafetensorsFolder(path)
        return LoadedCheckpoint(model_from_hf(config, folder.get, dtype, mesh), path,
                                hf_config=hf_config)
    raise CheckpointError(path, "not a checkpoint: expected an HF folder (config.json + "
                                "*.safetensors) or a .gguf file")
