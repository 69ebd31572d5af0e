"""Decode rooflines: bytes one decode step must read, and the card's measured copy bandwidth.

    python -m bench.roofline --model gemma-4-E4B-it --context 1024 [--batch-size 1] [--measure]

Bytes per decode step (performance-targets.md §3.2), counted from the model's own parameters (built
on the meta device, so nothing is allocated):
  * every weight of the text decoder, read once per step, except the lookup tables (the main
    embedding and the per-layer-embedding table: one row per token each, not counted);
  * the tied lm_head (vocab x hidden) counts once, as the logits GEMV reads it whole;
  * MoE experts: only the experts the batch touches, E * (1 - (1 - k/E)^B) expected (8 of 128 at B=1);
  * KV: per sequence, every cache-owning layer reads K and V for min(context, window) positions
    (sliding) or context positions (full); KV-shared layers read none of their own.
Bandwidth: a large device-to-device copy timed with CUDA events, counting read + write bytes
(the convention of the ~3.0 TB/s "practical" H100 figure).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOKUP_TABLES = ("embed_tokens_per_layer",)      # gathered one row per token
TIED_EMBEDDING = "embed_tokens"                  # read whole as the lm_head


@dataclass
class DecodeBytes:
    params_total: int           # text decoder parameters (embedding tables included)
    params_read: int            # parameters read per step (lm_head once, touched experts only)
    weight_bytes: int
    kv_bytes: int               # summed over the batch
    batch_size: int
    context: int
    experts_touched: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def min_step_ms(self, bandwidth_bytes_per_s: float) -> float:
        return 1e3 * self.total_bytes / bandwidth_bytes_per_s


def load_model_config(model: str):
    """A ModelConfig from a checkpoint directory or a built-in geometry name (gemma-4-E4B-it, ...)."""
    from gemma4rt.model_config import load_model_config as load_dir, parse_model_config

    if os.path.isdir(model):
        return load_dir(model)
    from gemma4rt.configs import lookup_builtin_config
    cfg = lookup_builtin_config(model)
    if cfg is None:
        raise SystemExit(f"{model!r} is neither a checkpoint directory nor a built-in geometry name")
    return parse_model_config(cfg)


def experts_touched(num_experts: int, top_k: int, batch_size: int) -> float:
    if num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)


def parameter_counts(model_cfg) -> dict[str, int]:
    """{"dense": read-every-step params, "experts": all expert params, "lookup": table params,
    "embedding": the tied embedding / lm_head} from the model built on the meta device."""
    import torch

    from gemma4rt.model.gemma4 import Gemma4Model

    with torch.device("meta"):
        model = Gemma4Model(model_cfg)
    counts = {"dense": 0, "experts": 0, "lookup": 0, "embedding": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ("vision" in name or "audio" in name) and "language_model" not in name:
            continue        # towers: not part of a text decode step
        parts = name.split(".")
        if any(t in parts for t in LOOKUP_TABLES):
            counts["lookup"] += p.numel()
        elif TIED_EMBEDDING in parts:
            counts["embedding"] += p.numel()
        elif "experts" in parts:
            counts["experts"] += p.numel()
        else:
            counts["dense"] += p.numel()
    text = model_cfg.text
    if not text.tie_word_embeddings:   # an untied lm_head is a dense weight; the embedding is a lookup
        counts["lookup"] += counts["embedding"]
        counts["embedding"] = 0
    return counts


def kv_bytes_per_seq(text, context: int, dtype_bytes: int = 2) -> int:
    total = 0
    for l in text.layers:
        if l.kv_shared:
            continue
        n = min(context, text.sliding_window) if l.is_sliding else context
        total += 2 * n * l.num_kv_heads * l.head_dim * dtype_bytes
    return total


def decode_bytes(model_cfg, context: int, batch_size: int = 1, dtype_bytes: int = 2,
                 counts: Optional[dict] = None) -> DecodeBytes:
    text = model_cfg.text
    counts = counts or parameter_counts(model_cfg)
    touched = 0.0
    experts_read = 0.0
    if text.enable_moe_block and text.num_experts:
        touched = experts_touched(text.num_experts, text.top_k_experts, batch_size)
        experts_read = counts["experts"] * touched / text.num_experts
    read = counts["dense"] + counts["embedding"] + experts_read
    return DecodeBytes(params_total=sum(counts.values()), params_read=int(read),
                       weight_bytes=int(read * dtype_bytes),
                       kv_bytes=batch_size * kv_bytes_per_seq(text, context, dtype_bytes),
                       batch_size=batch_size, context=context, experts_touched=touched)


def measure_copy_bandwidth(device=None, nbytes: int = 2 << 30, iters: int = 20) -> Optional[float]:
    """Bytes/s of a device-to-device copy (read + write counted). None off the GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device or "cuda")
    free, _ = torch.cuda.mem_get_info(dev)
    nbytes = int(min(nbytes, free // 3))
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(dev)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize(dev)
    secs = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * nbytes * iters / secs


def card_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "cpu"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir or built-in name (gemma-4-E4B-it, ...)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--bandwidth-tbps", type=float, default=3.0, help="used when --measure is off or no GPU")
    p.add_argument("--measure", action="store_true", help="measure the copy bandwidth of this GPU")
    a = p.parse_args(argv)
    cfg = load_model_config(a.model)
    counts = parameter_counts(cfg)
    bw = (measure_copy_bandwidth() if a.measure else None) or a.bandwidth_tbps * 1e12
    rows = []
    print(f"{a.model}: bandwidth {bw / 1e12:.2f} TB/s ({'measured on ' + card_name() if a.measure else 'given'})")
    print(f"{'batch':>6} {'params read (B)':>16} {'weights GB':>11} {'KV GB':>8} {'min step ms':>12} {'tok/s':>10}")
    for bs in a.batch_size:
        d = decode_bytes(cfg, a.context, bs, a.dtype_bytes, counts)
        ms = d.min_step_ms(bw)
        rows.append({**asdict(d), "min_step_ms": ms, "bandwidth": bw})
        print(f"{bs:>6} {d.params_read / 1e9:>16.2f} {d.weight_bytes / 1e9:>11.2f} {d.kv_bytes / 1e9:>8.3f} "
              f"{ms:>12.2f} {bs / ms * 1e3:>10.0f}")
    return {"model": a.model, "context": a.context, "rows": rows}


if __name__ == "__main__":
    main()
