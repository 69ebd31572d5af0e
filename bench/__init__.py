"""Benchmarks: serving client (bench_serving-compatible), one-batch latency, rooflines, target runs.

Run the scripts from the repository root, e.g. `python -m bench.serving --help` or
`python bench/serving.py --help`.
"""
