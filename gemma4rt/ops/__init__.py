"""ops: the Python face of csrc. Each op dispatches to gemma4rt._C when the extension is built and the
tensors live on a GPU, else to its PyTorch reference in ops/reference.py (the specification)."""
