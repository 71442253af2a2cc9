"""The Colab notebook runs top to bottom as written: executed here on the CPU with the demo
cut to a few steps, in a temporary workdir, it must print the results table and draw the
rank montage."""
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")
# The demo at the smallest size that still trains, extracts and evaluates both networks.
SMALL_DEMO = {"train.steps": 2, "train.batch_size": 16, "train.log_every": 1,
              "data.synthetic_ids": 8, "data.image_size": 64}


def test_every_cell_has_an_id_and_the_notebook_validates():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    ids = [cell.id for cell in nb.cells]
    assert len(set(ids)) == len(ids) and all(ids)
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_on_a_cpu(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = str(tmp_path / "demo")
    # what a user edits in the parameters cell: nothing to install (the test environment has
    # upm_jax), a temporary workdir, the small demo; DATASET stays empty
    nb.cells[1].source += f"\nEXTRA = ''\nWORKDIR = {workdir!r}\nDEMO = {SMALL_DEMO!r}\n"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute(env=dict(os.environ, JAX_PLATFORMS="cpu"))

    def text(cell_id):
        cell = next(c for c in nb.cells if c.id == cell_id)
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    assert f"upm_jax code in {ROOT}" in text("get-code")
    table = text("demo")
    assert "AP mode" in table and "rank1" in table and "mAP" in table
    assert "initial mean" in table and "trained mean" in table
    assert "training changed Rank-1 by" in table
    assert "compiled the training step in" in table
    assert "rank1" in text("evaluate")
    shown = [o for c in nb.cells if c.id == "evaluate" for o in c.outputs
             if o.output_type == "display_data"]
    assert shown and "image/png" in shown[0]["data"]
    assert "DATASET is empty" in text("real")
    assert os.path.isfile(os.path.join(workdir, "results.json"))
