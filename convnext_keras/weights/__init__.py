"""Checkpoint files to Keras weights: safe reading, the foreign layouts, conversion, the cache,
downloads and the Hugging Face Hub.
"""
