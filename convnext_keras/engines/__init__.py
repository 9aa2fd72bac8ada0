"""The CPU graph engines: this library's ONNX graph of a built model, run by OpenVINO or
onnxruntime (and onnxruntime's int8).
"""

import lazy_loader as _lazy

#: Modules reachable as attributes (``ck.engines.runners``), imported on first use.
__getattr__, __dir__, __all__ = _lazy.attach(
    __name__, ["onnx_graph", "quantization", "runners", "upernet_graph"]
)
