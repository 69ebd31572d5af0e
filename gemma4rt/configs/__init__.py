"""configs: the published geometries of every released Gemma 4 variant (Hub `config.json` dialect).

Owns one JSON file per released model (targets and their `-assistant` MTP drafters), written from
reference/gemma4-architecture.md §1-§2. Receives a model name or Hub id; emits a fresh config dict, used
for `--load-format dummy` (real-size random weights) and for sizing memory before weights exist.

    lookup_builtin_config("google/gemma-4-E4B-it")  # -> dict, or None if unknown
"""

from __future__ import annotations

import json
from pathlib import Path

_DIR = Path(__file__).parent

# canonical name -> Hub repository id
KNOWN_MODELS: dict[str, str] = {
    name: f"google/{name}"
    for name in (
        "gemma-4-E2B-it",
        "gemma-4-E4B-it",
        "gemma-4-12B-it",
        "gemma-4-31B-it",
        "gemma-4-26B-A4B-it",
        "gemma-4-E2B-it-assistant",
        "gemma-4-E4B-it-assistant",
        "gemma-4-12B-it-assistant",
        "gemma-4-31B-it-assistant",
        "gemma-4-26B-A4B-it-assistant",
    )
}
_BY_KEY = {name.lower(): name for name in KNOWN_MODELS}


def canonical_name(name_or_hub_id: str) -> str | None:
    """`gemma-4-E4B-it`, `google/gemma-4-e4b-it`, `GEMMA-4-E4B-IT/` → `gemma-4-E4B-it`; unknown → None."""
    key = str(name_or_hub_id).strip().rstrip("/")
    if key.lower().startswith("google/"):
        key = key[len("google/"):]
    if "/" in key:  # another organisation or a local path: not a built-in
        return None
    return _BY_KEY.get(key.lower())


def lookup_builtin_config(name_or_hub_id: str) -> dict | None:
    """A fresh copy of the built-in `config.json` dict for a released model, or None if unknown."""
    name = canonical_name(name_or_hub_id)
    if name is None:
        return None
    return json.loads((_DIR / f"{name}.json").read_text(encoding="utf-8"))
