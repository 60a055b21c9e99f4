"""The teaching notebooks in tutorials/ run from top to bottom (fast mode) without a cell error."""

import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = ["01_model_from_equations", "02_cite_seq_analysis", "03_extending_the_model",
            "04_predictive_checks", "05_modality_balance", "06_labels"]


def reads_shared_data(nb) -> bool:
    """Whether the notebook analyses a file of ../shared/data (it then looks for it with
    ``PYRO_TOTALVI_DATA_DIR`` or in shared/data above the working directory)."""
    return any("PYRO_TOTALVI_DATA_DIR" in c.source for c in nb.cells if c.cell_type == "code")


SHARED_DATA_NOTEBOOKS = [p for p in NOTEBOOKS if reads_shared_data(nbformat.read(p, as_version=4))]


KERNEL = "pyro-totalvi-tests"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A Jupyter kernel of the Python running the tests (its packages, its PYTHONPATH), under a
    project-specific name in a temporary Jupyter path: no kernel the user (or a setup script)
    installed is used or changed, and a fresh clone needs none."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (pyro_totalvi tests)", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        # JUPYTER_PATH comes first in the kernel search path
        mp.setenv("JUPYTER_PATH", os.pathsep.join(
            p for p in (str(root), os.environ.get("JUPYTER_PATH")) if p))
        yield KERNEL


def execute(path: Path, kernel: str) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh ``kernel`` with tutorials/ as working directory.

    nbclient raises ``CellExecutionError`` (with the cell's source and traceback) on the first
    cell that fails, and ``CellTimeoutError`` on a cell running over 600 s.
    """
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel,
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()
    return nb


def stdout(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("name") == "stdout")


def test_all_tutorials_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_structure_and_saved_outputs(path):
    """Opens with what it teaches, ends with what to try next, committed with its plots.

    Notebooks that read ../shared/data (02, 05) are the exception: nothing derived from that data
    may be committed, so they are stored without outputs (and executed by the tests below).
    """
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "What this notebook teaches" in nb.cells[0].source
    assert nb.cells[-1].cell_type == "markdown" and "What to try next" in nb.cells[-1].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    if reads_shared_data(nb):
        assert not any(c.outputs for c in code), "no outputs derived from ../shared/data"
    else:
        assert all(c.get("execution_count") for c in code), "commit the notebook executed"
        assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs)
    assert not [out for c in code for out in c.outputs if out.output_type == "error"]
    source = "\n".join(c.source for c in code)
    assert "PYRO_TOTALVI_FAST" in source and "torch.set_num_threads(2)" in source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_executes(path, monkeypatch, kernel):
    monkeypatch.setenv("PYRO_TOTALVI_FAST", "1")
    execute(path, kernel)


def test_shared_data_notebooks_are_recognised():
    assert [p.stem for p in SHARED_DATA_NOTEBOOKS] == ["02_cite_seq_analysis",
                                                       "05_modality_balance"]


@pytest.mark.slow
@pytest.mark.parametrize("path", SHARED_DATA_NOTEBOOKS, ids=[p.stem for p in SHARED_DATA_NOTEBOOKS])
def test_shared_data_tutorial_skips_cleanly_without_data(path, tmp_path, monkeypatch, kernel):
    """Without the real data file the notebook says so and every later cell is a no-op."""
    monkeypatch.setenv("PYRO_TOTALVI_FAST", "1")
    monkeypatch.setenv("PYRO_TOTALVI_DATA_DIR", str(tmp_path))
    nb = execute(path, kernel)
    assert "The rest of this notebook is skipped" in stdout(nb)
    assert "reading" not in stdout(nb)


def test_kernel_is_this_python(kernel):
    """The kernel the notebooks run in is found under its own name and runs this Python."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(kernel)
    assert spec.argv[0] == sys.executable
