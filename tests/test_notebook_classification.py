"""examples/classification.ipynb runs top to bottom (offline: it says so and uses random weights).

The official checkpoint is "served" by a loopback server that answers 404, so the notebook's
offline branch runs without touching the network; the test checks the notebook printed the
download error, said it uses random weights, and produced top-5 lists and a Grad-CAM figure.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "examples" / "classification.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


@pytest.mark.slow
def test_classification_notebook_runs_offline(loopback_server, monkeypatch, tmp_path):
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        assert not cell.get("outputs"), "the notebook is stored without outputs"
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "Could not download " + loopback_server.url + "convnext_tiny_1k_224_ema.pth" in outputs
    assert "RANDOM weights" in outputs and "(random weights: these labels mean nothing)" in outputs
    for photo in ("astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"):
        assert photo in outputs
    assert outputs.count("  5. ") == 4  # a top-5 list per photo
    assert "(4, 224, 224, 3) float32" in outputs
    assert "CAM grid: (4, 7, 7)" in outputs
    figures = [
        o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 1
