"""The graph cache's files: keyed by the converted weights' SHA-256 record, written atomically
with a record, checked on every read; damaged, unrecorded and replaced entries never used.

The cache layer does not read the graphs, so these tests write plain bytes; the engines'
side (a real graph, OpenVINO's blob) is tested in tests/tasks/test_graph_route.py.
"""

from __future__ import annotations

import hashlib
import logging

import pytest

from convnext_keras import registry
from convnext_keras.weights import graphs
from convnext_keras.weights.cache import converted_cache_path, write_record

CKPT = registry.CHECKPOINTS["convnextv2_atto_1k_224"]


def _converted(content: bytes) -> str:
    """Put 'converted weights' with their record into the cache; their SHA-256."""
    path = converted_cache_path(CKPT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    write_record(path, digest)
    return digest


def _key(**changes):
    key = graphs.graph_key(CKPT, "classifier", 224, 224, "fp32", "openvino", "2026.4.1")
    return key._replace(**changes) if key is not None else None


def test_a_key_needs_converted_weights_with_a_record():
    assert _key() is None  # nothing converted yet
    path = converted_cache_path(CKPT)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    assert _key() is None  # no record: no key (a graph is only keyed by recorded weights)
    digest = _converted(b"weights")
    key = _key()
    assert key.weights_sha256 == digest
    assert key.folder == graphs.graphs_dir() / CKPT.name / key.entry
    assert key.entry == (
        f"classifier-224x224-fp32-openvino-2026.4.1-g{graphs.GRAPH_FORMAT}-{digest}"
    )
    assert "/" not in _key(engine_version="2026.4.1-22982-releases/2026/4").entry


def test_a_graph_is_written_whole_and_checked_on_every_read(caplog):
    _converted(b"weights")
    key = _key()
    with graphs.entry_lock(key):
        assert graphs.cached_graph(key) is None
        path = graphs.save_graph(key, b"graph bytes")
    assert path == key.graph_path and path.read_bytes() == b"graph bytes"
    assert graphs.read_record(path) == hashlib.sha256(b"graph bytes").hexdigest()
    assert sorted(p.name for p in key.folder.iterdir()) == ["graph.onnx", "graph.onnx.sha256"]
    assert graphs.cached_graph(key) == path and graphs.graph_recorded(key)
    # Bit rot: moved aside, its blob with it, never returned.
    key.compiled_dir.mkdir()
    (key.compiled_dir / "1.blob").write_bytes(b"blob")
    path.write_bytes(b"graph bytez")
    caplog.set_level(logging.WARNING, logger="convnext_keras")
    assert graphs.cached_graph(key) is None
    assert not path.exists() and not key.compiled_dir.exists()
    assert len(list(key.folder.glob("graph.onnx.corrupt-*"))) == 1
    assert "is damaged (its SHA-256" in caplog.text
    # A graph without a record (not written by this library, or not whole) is not used either.
    graphs.save_graph(key, b"graph bytes")
    graphs.record_path(path).unlink()
    assert not graphs.graph_recorded(key)
    assert graphs.cached_graph(key) is None and "no SHA-256 record" in caplog.text


def test_new_weights_or_another_engine_version_replace_the_entry():
    _converted(b"weights")
    old = _key()
    other_size = _key(height=256, width=256)
    other_head = _key(head="pooled")
    for key in (old, other_size, other_head):
        graphs.save_graph(key, b"graph")
    new = _key(weights_sha256=_converted(b"weights, converted again"))
    assert new.folder != old.folder
    graphs.save_graph(new, b"graph of the new weights")
    assert not old.folder.exists()  # stale: removed
    assert other_size.folder.exists() and other_head.folder.exists()  # not replaced
    newer = new._replace(engine_version="2027.0")
    graphs.save_graph(newer, b"graph")
    assert not new.folder.exists() and newer.folder.exists()


def test_compiled_files_are_recorded_then_checked():
    _converted(b"weights")
    key = _key()
    graphs.save_graph(key, b"graph")
    folder = graphs.check_compiled(key)
    assert folder == key.compiled_dir and folder.is_dir()
    assert graphs.compiled_state(key) == frozenset()
    (folder / "123.blob").write_bytes(b"compiled")
    (folder / ".123.blob.x1y2.part").write_bytes(b"half")  # a writer's temporary file
    state = graphs.compiled_state(key)
    assert [name for name, *_ in state] == ["123.blob"]
    graphs.record_compiled(key)
    assert graphs.read_record(folder / "123.blob") == hashlib.sha256(b"compiled").hexdigest()
    graphs.check_compiled(key)
    assert (folder / "123.blob").is_file() and graphs.compiled_state(key) == state
    # Damaged: deleted with its record.  Unrecorded (a process died after the engine wrote
    # it): deleted.  A record without its file: dropped.
    (folder / "123.blob").write_bytes(b"compiles")
    (folder / "456.blob").write_bytes(b"unrecorded")
    write_record(folder / "789.blob", "0" * 64)
    graphs.check_compiled(key)
    assert sorted(p.name for p in folder.iterdir()) == [".123.blob.x1y2.part"]
    graphs.clear_compiled(key)
    assert not folder.exists()


@pytest.mark.parametrize("head", ["classifier", "pooled", "segmentation"])
def test_entries_of_each_head_live_apart(head):
    _converted(b"weights")
    key = _key(head=head)
    graphs.save_graph(key, head.encode())
    assert key.folder.name.startswith(f"{head}-224x224-")
    assert graphs.cached_graph(key).read_bytes() == head.encode()
