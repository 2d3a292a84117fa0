"""Retrieval benchmarks and metrics."""
