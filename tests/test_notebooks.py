"""The notebooks in examples/ run top to bottom (a notebook that breaks fails the suite), and
are kept in git without outputs."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {"01_quickstart", "02_inside_the_model", "05_sharding"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    """Outputs (plots, tracebacks, timings) make noisy diffs and stale pictures: strip them
    (e.g. `jupyter nbconvert --clear-output --inplace examples/*.ipynb`) before committing."""
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    """Executed in a fresh kernel of this interpreter (ipykernel's "python3" spec, which
    jupyter_client resolves to sys.executable), from the repository root so that the
    checkout's jaxserve is the one imported. A failing cell raises CellExecutionError naming
    the cell and its traceback."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    images = [o for c in nb.cells if "readme-image" in c.metadata.get("tags", [])
              for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the cell tagged readme-image (the README's picture) drew no figure"
