"""notebooks/retrieval_demo.ipynb runs top to bottom on a real kernel: with no checkpoint given it
trains a small run on the embedded set, loads its best checkpoint, draws the retrieval grids with
and without ITM re-ranking and the twin pairs, and plots the learning curves."""
import json
import pathlib

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "retrieval_demo.ipynb"


def test_retrieval_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("FINE_DEMO_CHECKPOINT", "")
    monkeypatch.setenv("FINE_DEMO_TRAIN_STEPS", "6")
    monkeypatch.setenv("FINE_DEMO_DATA_DIR", str(tmp_path / "synthetic"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The notebook is stored without outputs: what CI executes is what a user opens.
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    # 2 text->image grids, 2 image->text lists, 4 twin pairs, 1 panel of learning curves.
    assert len(figures) == 9, len(figures)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1200 images of 400 products, 200 twin pairs" in text
    assert text.count("similarity A:") == 4 and text.count("ITM B:") == 4
    # The small run it trained is the one it loaded and plotted.
    workdir = [line.split(":")[0] for line in text.splitlines() if "pretrain model" in line][0]
    rows = [json.loads(r) for r in open(pathlib.Path(workdir) / "metrics.jsonl")]
    assert max(r["step"] for r in rows if "loss" in r) == 6
