"""GPU kernel tests: each native op against its reference in gemma4rt/ops/reference.py. On a machine
without a CUDA device or without the built extension every module here is reported as skipped
("not run: ..."), never passed."""
