"""The CPU graph engines: this library's ONNX graph of a built model, run by OpenVINO or
onnxruntime (and onnxruntime's int8).
"""
