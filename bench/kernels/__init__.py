"""Kernel microbenchmarks (one module per op family); run_all.py prints the table."""
