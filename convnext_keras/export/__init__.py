"""Exports (SavedModel, ONNX, TFLite, ``.keras``), their verification, and the model collection
with its model cards.
"""
