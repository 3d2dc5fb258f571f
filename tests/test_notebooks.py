"""Every tutorial notebook in examples/notebooks runs top to bottom (nbclient, the python3 kernel of this
environment) and fails the test on any error; the notebooks assert their own findings."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "examples" / "notebooks").glob("*.ipynb"))


def test_the_four_tutorials_are_there():
    assert [p.stem for p in NOTEBOOKS] == ["01_profile_moe", "02_steer_and_ablate", "03_knowledge_circuit",
                                           "04_sae_features"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs are not committed"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
