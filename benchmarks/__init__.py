"""Micro- and model-level benchmarks (run each as `python -m benchmarks.<name>`)."""
