"""Pallas kernels (JAX on a GPU) that the network's layers use where they are faster."""
