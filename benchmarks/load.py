"""Time loading the default model (SmolLM2-135M-Instruct) until its params are on the mesh,
from the GGUF file, from an HF safetensors folder and from an orbax checkpoint.

    python benchmarks/load.py [--workdir /tmp/jaxserve-load] [--repeat 3] [--tp 1,3]

The safetensors folder and the orbax checkpoint are written from the GGUF once (into
--workdir); each load is timed --repeat times in this process: the first run and the best
(files in the page cache by then), float32. Every path creates the model abstractly and puts
each array straight into its sharding on the mesh (GGUF and safetensors a layer at a time from
the host; orbax reads each device's slices).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/jaxserve-load")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tp", default="1,3", help="tensor-parallel sizes (comma-separated)")
    a = ap.parse_args()

    import jax
    from flax import nnx
    import numpy as np
    from safetensors.numpy import save_file

    from jaxserve.models.fetch import default_model_path
    from jaxserve.models.gguf import read_gguf
    from jaxserve.models.loader import load_checkpoint
    from jaxserve.models.orbax import convert, is_orbax_checkpoint, restore
    from jaxserve.parallel import make_mesh

    gguf = default_model_path()
    work = Path(a.workdir)
    folder, orbax = work / "safetensors", work / "orbax"
    if not (folder / "model.safetensors").exists():
        g = read_gguf(gguf)  # HF-named float tensors, as the GGUF loader sees them
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in g.tensors.items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(g.hf_config))
    if not is_orbax_checkpoint(orbax):
        t0 = time.perf_counter()
        convert(gguf, orbax)
        print(f"convert (once): {time.perf_counter() - t0:.2f} s")

    def timed(load) -> tuple[float, float]:
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(load())
            times.append(time.perf_counter() - t0)
        return times[0], min(times)

    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; first / best of {a.repeat}")
    for tp in (int(x) for x in a.tp.split(",")):
        mesh = make_mesh(tp)
        rows = {
            "gguf (dequantize Q4_1)": lambda: nnx.state(load_checkpoint(gguf, mesh=mesh).model),
            "safetensors": lambda: nnx.state(load_checkpoint(folder, mesh=mesh).model),
            "orbax": lambda: nnx.state(restore(orbax, mesh).model),
        }
        for name, load in rows.items():
            first, best = timed(load)
            print(f"tp={tp}  {name:24s} {first:6.2f} s / {best:6.2f} s")



if __name__ == "__main__":
    main()
