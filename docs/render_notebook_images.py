"""Re-render the README's notebook pictures: execute each notebook in examples/ and write the
figure of its cell tagged "readme-image" to docs/img/<notebook>.png (the notebooks themselves are
left without outputs).

    python docs/render_notebook_images.py                      # all notebooks (a few minutes)
    python docs/render_notebook_images.py 02_inside_the_model  # one
    JAXSERVE_EXECUTED=/tmp/nb python docs/render_notebook_images.py   # also keep the executed copies

Needs the notebook extra and nbclient (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent


def render(path: Path, out_dir: Path) -> Path:
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    if os.environ.get("JAXSERVE_EXECUTED"):
        keep = Path(os.environ["JAXSERVE_EXECUTED"])
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, keep / path.name)
    for cell in nb.cells:
        if "readme-image" in cell.metadata.get("tags", []):
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    target = out_dir / f"{path.stem}.png"
                    target.write_bytes(base64.b64decode(output["data"]["image/png"]))
                    return target
    raise SystemExit(f"{path.name}: no figure in a cell tagged readme-image")


def main(names: list[str]) -> None:
    out_dir = ROOT / "docs" / "img"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted((ROOT / "examples").glob("*.ipynb"))
    for path in paths:
        if not names or path.stem in names:
            t0 = time.perf_counter()
            target = render(path, out_dir)
            print(f"{path.name} -> {target.relative_to(ROOT)} ({target.stat().st_size // 1024} KiB, "
                  f"executed in {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
