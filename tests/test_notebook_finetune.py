"""examples/finetune.ipynb runs top to bottom at its small setting, offline.

The official checkpoint is "served" by a loopback server answering 404, so the notebook takes
its offline branch (ConvNeXt-atto from random weights, said so in its output) without touching
the network; the test checks the layer-decay table, the run's results and the figures.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_notebook_classification import _text  # a cell's printed text

NOTEBOOK = Path(__file__).parent.parent / "examples" / "finetune.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_finetune_notebook_runs_offline_at_a_small_setting(loopback_server, monkeypatch, tmp_path):
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    monkeypatch.setenv("CONVNEXT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("CONVNEXT_NOTEBOOK_WORK", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "Could not download " + loopback_server.url + "convnext_tiny_1k_224_ema.pth" in outputs
    assert "offline: training convnext_atto from RANDOM weights at 32x32" in outputs
    assert "train {'brick': 24, 'grass': 24, 'gravel': 24" in outputs
    # The layer-decay table: 14 groups would need 27 blocks in stage 2; atto's 6 use 3..10.
    assert re.search(r"^\s+0\s+0\.0550\s+4\s+stem_conv$", outputs, re.M), outputs
    assert re.search(r"^\s+13\s+1\.0000\s+4\s+head_norm$", outputs, re.M)
    assert "LayerDecayAdamW ready for model.fit(...)" in outputs
    assert "epoch 3/3" in outputs and "best epoch" in outputs
    accuracy = float(re.search(r"held-out accuracy: ([0-9.]+) on 40 crops", outputs).group(1))
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "run" / "best.keras").is_file()
    figures = [
        o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 3  # samples, training curves, predictions
