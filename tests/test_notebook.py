"""notebooks/sample.ipynb runs top to bottom against a tiny trained run and shows a sample grid."""

import base64
import io
import os
import sys

import pytest
from PIL import Image

from tests.fixtures_tiny_run import tiny_run  # noqa: F401

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "sample.ipynb")


def test_sample_notebook_shows_a_grid(tiny_run, monkeypatch):  # noqa: F811
    # The kernel inherits this environment: a small grid of the tiny run.
    for name, value in {"DIG_WORKDIR": tiny_run, "DIG_NUM_STEPS": "2", "DIG_PER_CLASS": "1", "DIG_MAX_CLASSES": "3",
                        "DIG_CFG_SCALE": "1.5"}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The "python3" kernel is started with this interpreter (jupyter_client substitutes sys.executable); the
    # extra cell checks that, so the notebook is tested against this environment's packages.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))

    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError on the first cell that fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    pictures = [output.data["image/png"] for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) == 1
    # 3 classes x 1 image of 16 px with 2 px padding: a 20 x 56 grid, enlarged by a whole factor.
    with Image.open(io.BytesIO(base64.b64decode(pictures[0]))) as picture:
        width, height = picture.size
    assert width % 20 == 0 and height * 20 == width * 56
    kernel_executable = notebook.cells[-1].outputs[0].text.strip()
    assert os.path.realpath(kernel_executable) == os.path.realpath(sys.executable)
