"""tools: command-line utilities (tiny random checkpoints for tests and the demo model)."""
