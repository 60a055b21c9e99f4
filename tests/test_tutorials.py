"""The teaching notebooks in tutorials/ run from top to bottom (fast mode) without a cell error."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = ["01_model_from_equations", "02_cite_seq_analysis", "03_extending_the_model",
            "04_predictive_checks", "06_labels"]


def execute(path: Path) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh python3 kernel with tutorials/ as working directory.

    nbclient raises ``CellExecutionError`` (with the cell's source and traceback) on the first
    cell that fails, and ``CellTimeoutError`` on a cell running over 600 s.
    """
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
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

    02 is the exception: its plots come from ../shared/data, and nothing derived from that data
    may be committed, so it is stored without outputs (and executed by the test below).
    """
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "What this notebook teaches" in nb.cells[0].source
    assert nb.cells[-1].cell_type == "markdown" and "What to try next" in nb.cells[-1].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    if path.stem == "02_cite_seq_analysis":
        assert not any(c.outputs for c in code), "no outputs derived from ../shared/data"
    else:
        assert all(c.get("execution_count") for c in code), "commit the notebook executed"
        assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs)
    assert not [out for c in code for out in c.outputs if out.output_type == "error"]
    source = "\n".join(c.source for c in code)
    assert "PYRO_TOTALVI_FAST" in source and "torch.set_num_threads(2)" in source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_executes(path, monkeypatch):
    monkeypatch.setenv("PYRO_TOTALVI_FAST", "1")
    execute(path)


@pytest.mark.slow
def test_cite_seq_tutorial_skips_cleanly_without_data(tmp_path, monkeypatch):
    """Without the real data file the notebook says so and every later cell is a no-op."""
    monkeypatch.setenv("PYRO_TOTALVI_FAST", "1")
    monkeypatch.setenv("PYRO_TOTALVI_DATA_DIR", str(tmp_path))
    nb = execute(TUTORIALS / "02_cite_seq_analysis.ipynb")
    assert "The rest of this notebook is skipped" in stdout(nb)
    assert "reading" not in stdout(nb)
