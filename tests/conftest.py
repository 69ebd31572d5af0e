"""Shared fixtures: tiny random Gemma 4 checkpoints written with transformers' own classes."""
import os

import pytest

FAMILIES = ("e", "dense", "moe", "unified")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, text_only=False) -> directory (cached per session)."""
    import torch
    from gemma4rt.tools.tiny_checkpoint import write_tiny_checkpoint

    cache = {}

    def make(family: str, text_only: bool = False, seed: int = 0) -> str:
        key = (family, text_only, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}{'-text' if text_only else ''}-{seed}")
            cache[key] = str(write_tiny_checkpoint(out, family, seed=seed, dtype=torch.float32,
                                                   text_only=text_only))
        return cache[key]

    return make


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
