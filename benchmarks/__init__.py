"""Benchmarks of e2evlp's kernels against their references and peers (run as `python -m benchmarks.<name>`)."""
