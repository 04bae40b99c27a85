"""Benchmarks and the tile tuner (``python -m benchmarks.bench``, ``python -m benchmarks.tune``)."""
