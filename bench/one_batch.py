"""Static-batch prefill and decode latency with the in-process engine (performance-targets.md §2.5).

    python -m bench.one_batch --model-path gemma-4-E4B-it --load-format dummy \
        --batch-size 1 8 32 --input-len 1024 --output-len 64 [--reference] [--output-file r.jsonl]

For each batch size: `bs` requests of `input_len` synthetic ids are added at once (ignore_eos,
greedy, `output_len` new tokens each) and the engine is stepped until they finish. Every step of
the model runner is timed with a device synchronisation on both sides, so the figures exclude
nothing the GPU does and include the runner's host work (batch building, sampling); the engine step
(scheduler included) is timed around it. Reported:
  prefill: the steps that ran prompt tokens (one step when chunked_prefill_size >= bs * input_len),
           latency and bs * input_len / latency;
  decode:  median runner step latency (and the engine step's), bs / median = tokens/s;
  batch-1 TPOT: the median decode step at batch 1, at a mean context of input_len + output_len / 2.
With --reference the same batch-1 decode runs in transformers' own model (random weights from the
same config, static cache on the GPU), and bench/roofline.py turns the model's bytes per decode step
and the copy bandwidth measured in this run into the fraction of the bandwidth limit reached.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.workloads import synthetic_ids

ID_RANGE = (1000, 100000)


def _sync_fn(device):
    import torch
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _id_range(vocab: int) -> tuple[int, int]:
    low, high = ID_RANGE
    high = min(high, vocab)
    low = min(low, max(3, high // 4))       # tiny vocabularies: keep clear of the low special ids
    return low, high


class StepTimer:
    """Records (is_prefill, tokens, requests, seconds) per step. Synchronous engine: wraps runner.execute
    and times each step between device synchronisations. Overlap scheduling (overlapped=True): wraps
    runner.launch without synchronising (that would undo the overlap) and gives each step the time until
    the next launch: in steady decode, the period at which tokens come out."""

    def __init__(self, runner, sync, overlapped: bool = False):
        self.records: list[tuple[bool, int, int, float]] = []
        self.overlapped = overlapped
        self._sync = sync
        self._prev: Optional[tuple[bool, int, int, float]] = None     # overlap: the last launch, untimed
        if overlapped:
            self._orig = runner.launch
            runner.launch = self._launch
        else:
            self._orig = runner.execute
            runner.execute = self

    @staticmethod
    def _kind(plan) -> tuple[bool, int, int]:
        return (any(s.num_tokens > 1 for s in plan.scheduled), sum(s.num_tokens for s in plan.scheduled),
                len(plan.scheduled))

    def reset(self) -> None:
        """Forget the records and the launch in flight (call between batches)."""
        self.records.clear()
        self._prev = None

    def __call__(self, plan):
        self._sync()
        t0 = time.perf_counter()
        result = self._orig(plan)
        self._sync()
        self.records.append(self._kind(plan) + (time.perf_counter() - t0,))
        return result

    def _launch(self, plan):
        now = time.perf_counter()
        if self._prev is not None:
            self.records.append(self._prev[:3] + (now - self._prev[3],))
        self._prev = self._kind(plan) + (now,)
        return self._orig(plan)


def build_engine(model_path: str, *, device: str, dtype: str, load_format: str, max_bs: int, input_len: int,
                 output_len: int, page_size: int = 16, seed: int = 0, disable_cuda_graph: bool = False,
                 mem_fraction_static: float = 0.85, extra_prompt_len: int = 0, tp: int = 1,
                 cuda_graph_max_tokens: int = 0, draft_model_path: Optional[str] = None, spec_steps: int = 3,
                 overlap: bool = False, context_length: Optional[int] = None):
    """extra_prompt_len > 0: room for one more request of that many tokens beside a full batch (the
    prompt-step profile). draft_model_path: speculative decoding with that assistant drafter."""
    from gemma4rt.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
    from gemma4rt.engine import Engine

    tokens = max_bs * (input_len + output_len) + 8 * page_size * max_bs
    if extra_prompt_len:
        tokens += extra_prompt_len + 8 * page_size
    # the sliding pool holds max_running windows; a static batch prefills whole prompts in one step,
    # so give it room for every token of every request (sliding pages are freed only between steps)
    from bench.roofline import load_model_config
    window = load_model_config(model_path).text.sliding_window
    win_pages = -(-window // page_size) + 2
    need_pages = max_bs * (-(-(input_len + output_len) // page_size) + 2)
    max_running = max(max_bs, -(-need_pages // win_pages)) + (1 if extra_prompt_len else 0)
    cfg = EngineConfig(
        model_path=model_path, dtype=dtype, device=device, load_format=load_format, seed=seed,
        context_length=context_length or max(input_len + output_len + 2 * page_size,
                                             extra_prompt_len + 2 * page_size, 64),
        cache=CacheConfig(page_size=page_size, max_total_tokens=tokens, disable_radix_cache=True,
                          mem_fraction_static=mem_fraction_static),
        # synchronous steps unless asked (StepTimer then times the launch period)
        scheduler=SchedulerConfig(max_running_requests=max_running, overlap_schedule=overlap,
                                  chunked_prefill_size=max(max_bs * input_len, extra_prompt_len + max_bs, 2048)),
        disable_cuda_graph=disable_cuda_graph,
        # with mixed graphs, room for the profiled prompt's request beside the batch
        cuda_graph_max_bs=max(max_bs, 1) + (1 if extra_prompt_len and cuda_graph_max_tokens else 0),
        cuda_graph_max_tokens=cuda_graph_max_tokens,
        parallel=ParallelConfig(tp=tp),
        speculative=SpeculativeConfig(algorithm="NEXTN", draft_model_path=draft_model_path, num_steps=spec_steps)
        if draft_model_path else SpeculativeConfig())
    return Engine(cfg)


def run_batch(engine, timer: StepTimer, bs: int, input_len: int, output_len: int, tag: str, seed: int = 0) -> dict:
    from gemma4rt.protocol import AddRequest, SamplingParams

    low, high = _id_range(engine.model_info.vocab_size)
    rng = np.random.RandomState(seed)
    offsets = rng.randint(0, high - low, size=bs)
    sp = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(bs):
        err = engine.add_request(AddRequest(rid=f"{tag}-{i}", sampling=sp,
                                            prompt_token_ids=synthetic_ids(int(offsets[i]), i, input_len, low, high)))
        if err:
            raise RuntimeError(f"request rejected: {err}")
    timer.reset()
    engine_step_s: list[tuple[int, float]] = []     # (index into timer.records, engine step seconds)
    generated = 0
    t0 = time.perf_counter()
    while engine.has_work():
        n0 = len(timer.records)
        s0 = time.perf_counter()
        outs = engine.step()
        if len(timer.records) > n0:
            engine_step_s.append((n0, time.perf_counter() - s0))
        for o in outs.outputs:
            if o.finish_reason == "error" or o.error:
                raise RuntimeError(f"request {o.rid} failed: {o.error}")
            generated += len(o.new_token_ids)
    total = time.perf_counter() - t0
    prefill = [r for r in timer.records if r[0]]
    decode = [r for r in timer.records if not r[0]]
    decode_engine = [s for i, s in engine_step_s if not timer.records[i][0]]
    # overlap: a prompt step's launch period is not its latency (nothing waits for it): not measured
    prefill_s = float("nan") if timer.overlapped else sum(r[3] for r in prefill)
    med = statistics.median(r[3] for r in decode) if decode else float("nan")
    return {
        "batch_size": bs, "input_len": input_len, "output_len": output_len,
        "generated_tokens": generated, "prefill_steps": len(prefill), "decode_steps": len(decode),
        "prefill_latency_ms": 1e3 * prefill_s,
        "prefill_throughput": bs * input_len / prefill_s if prefill_s > 0 else float("nan"),
        "median_decode_ms": 1e3 * med,
        "mean_decode_ms": 1e3 * statistics.fmean(r[3] for r in decode) if decode else float("nan"),
        "median_decode_engine_ms": 1e3 * statistics.median(decode_engine) if decode_engine else float("nan"),
        "decode_throughput": bs / med if decode else float("nan"),
        "total_latency_s": total,
        "total_throughput": bs * (input_len + output_len) / total,
    }


# ------------------------------------------------------------------------------------------ reference
def hf_text_config(model_path: str):
    """transformers config of the text decoder, from a checkpoint dir or a built-in geometry name."""
    from transformers import AutoConfig

    if os.path.isdir(model_path):
        with open(os.path.join(model_path, "config.json")) as f:
            raw = json.load(f)
    else:
        from gemma4rt.configs import lookup_builtin_config
        raw = lookup_builtin_config(model_path)
        if raw is None:
            raise ValueError(f"unknown model {model_path!r}")
    text = dict(raw.get("text_config") or raw)
    model_type = text.pop("model_type")
    text.pop("dtype", None)
    text.pop("architectures", None)
    return AutoConfig.for_model(model_type, **text)


class _Stamps:
    """A generate() streamer that only records when each token batch arrives (synchronised)."""

    def __init__(self, sync):
        self.times, self._sync = [], sync

    def put(self, value):
        self._sync()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def reference_decode(model_path: str, *, device: str, dtype: str, input_len: int, output_len: int,
                     compile_forward: bool = False, seed: int = 0) -> dict:
    """Batch-1 greedy decode in transformers' model (random weights, same geometry)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gemma4rt.worker.model_runner import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = hf_text_config(model_path)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
    build_s = time.perf_counter() - t0
    sync = _sync_fn(dev)
    low, high = _id_range(cfg.vocab_size)
    ids = torch.tensor([synthetic_ids(12345, 0, input_len, low, high)], device=dev)
    kw = dict(do_sample=False, pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    if dev.type == "cuda":
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = not compile_forward
    with torch.inference_mode():
        warm = _Stamps(sync)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       streamer=warm, **kw)
        st = _Stamps(sync)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                       min_new_tokens=output_len, streamer=st, **kw)
    # times[0]: the prompt; times[1]: first token (prefill); then one per decode step
    gaps = [b - a for a, b in zip(st.times[1:], st.times[2:])]
    out = {"reference": "transformers", "attn_implementation": getattr(cfg, "_attn_implementation", None),
           "compiled": bool(compile_forward and dev.type == "cuda"),
           "static_cache": dev.type == "cuda", "build_s": build_s,
           "prefill_ms": 1e3 * (st.times[1] - st.times[0]) if len(st.times) > 1 else float("nan"),
           "median_decode_ms": 1e3 * statistics.median(gaps) if gaps else float("nan")}
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.one_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="checkpoint dir, or a built-in name with --load-format dummy")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--context-length", type=int, default=None,
                   help="the engine's context length (default: just what the batch needs; a server's default is "
                        "the model's, which sets the attention plan's key span in the CUDA graphs)")
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--cuda-graph-max-tokens", type=int, default=1024,
                   help="mixed prefill + decode CUDA graphs up to this many tokens (the server's default, 1024; 0: off)")
    p.add_argument("--enable-overlap-schedule", action="store_true",
                   help="schedule as the server does by default (step k+1 launched before step k's tokens are "
                        "back); the decode time is then the launch period, and prefill times are not measured")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up batch (4 new tokens) per batch size")
    p.add_argument("--reference", action="store_true", help="also time batch-1 decode in transformers' model")
    p.add_argument("--reference-compile", action="store_true", help="torch.compile the reference forward (GPU)")
    p.add_argument("--bandwidth-tbps", type=float, default=None, help="skip the copy measurement, use this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (the roofline then divides the model's bytes by "
                   "their summed bandwidth: optimistic, every GPU reads the replicated embeddings and LM head)")
    p.add_argument("--output-file", default=None, help="append one JSON line with everything measured")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="after timing, profile 8 decode steps of the first batch size with torch.profiler and "
                        "write GPU-busy time per step and the kernels by total time to FILE")
    p.add_argument("--profile-prompt", default=None, metavar="FILE",
                   help="profile 8 steps that each carry one new prompt of --profile-prompt-len tokens beside "
                        "the first batch size's decode rows (the serving pattern: prompts arrive one by one "
                        "while a batch decodes); the same report as --profile, to FILE")
    p.add_argument("--profile-prompt-len", type=int, default=600)
    p.add_argument("--speculative-draft-model-path", default=None,
                   help="speculative decoding with this assistant drafter (a built-in name with --load-format dummy: "
                        "random weights accept no draft, so the decode step time is the drafting + verification "
                        "overhead per token)")
    p.add_argument("--speculative-num-steps", type=int, default=3)
    return p


def profile_decode(engine, timer: StepTimer, bs: int, input_len: int, path: str, steps: int = 8,
                   prompt_len: int = 0) -> dict:
    """Profile `steps` decode steps at batch `bs`: GPU kernel time per step against the step's wall time
    (their gap is host work and launch latency), kernel launches per step, the kernels by total time.
    prompt_len > 0: before each profiled step one new request of prompt_len tokens arrives, so every
    profiled step carries a whole prompt beside the bs decode rows (it decodes one token and finishes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gemma4rt.protocol import AddRequest, SamplingParams

    low, high = _id_range(engine.model_info.vocab_size)
    sp = SamplingParams(max_new_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    tag = f"prof{prompt_len}"
    for i in range(bs):
        engine.add_request(AddRequest(rid=f"{tag}-{i}", sampling=sp,
                                      prompt_token_ids=synthetic_ids(i * 7, i, input_len, low, high)))
    while engine.has_work() and not (engine.scheduler.running and
                                     all(r.num_output_tokens >= 2 for r in engine.scheduler.running)):
        engine.step()                                   # prefill and the first decode steps unprofiled
    timer.reset()
    one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for k in range(steps):
            if not engine.has_work():
                break
            if prompt_len:
                engine.add_request(AddRequest(rid=f"{tag}-new-{k}", sampling=one, prompt_token_ids=synthetic_ids(
                    k * 13 + 5, bs + k, prompt_len, low, high)))
            engine.step()
    profiled = [r for r in timer.records if r[0] == bool(prompt_len)]
    n_other = len(timer.records) - len(profiled)
    while engine.has_work():
        engine.step()
    n = max(1, len(profiled))
    wall_ms = 1e3 * sum(r[3] for r in profiled) / n
    from gemma4rt.worker.profiling import kernel_table
    table, gpu_ms, launches = kernel_table(prof, n)
    what = (f"steps with one {prompt_len}-token prompt beside {bs} decode rows" if prompt_len else
            f"decode at batch {bs}")
    tokens = statistics.fmean(r[1] for r in profiled) if profiled else 0.0
    lines = [f"{what}, {n} steps ({tokens:.0f} tokens/step): wall {wall_ms:.3f} ms/step, GPU kernel time "
             f"{gpu_ms:.3f} ms/step ({100 * gpu_ms / wall_ms:.0f}% busy), {launches:.0f} kernels/step"
             + (f" [{n_other} other steps in the window]" if n_other else "")] + table
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))
    return {"wall_ms": wall_ms, "gpu_ms": gpu_ms, "kernels_per_step": launches, "steps": len(profiled),
            "tokens_per_step": tokens, "prompt_len": prompt_len}


def main(argv: Optional[list[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    if min(a.batch_size) < 1 or a.input_len < 1 or a.output_len < 2:
        raise SystemExit("--batch-size >= 1, --input-len >= 1 and --output-len >= 2 are needed")
    import torch

    from bench import roofline

    t0 = time.perf_counter()
    engine = build_engine(a.model_path, device=a.device, dtype=a.dtype, load_format=a.load_format,
                          max_bs=max(a.batch_size), input_len=a.input_len, output_len=a.output_len,
                          page_size=a.page_size, seed=a.seed, disable_cuda_graph=a.disable_cuda_graph,
                          mem_fraction_static=a.mem_fraction_static,
                          extra_prompt_len=a.profile_prompt_len if a.profile_prompt else 0, tp=a.tp,
                          cuda_graph_max_tokens=a.cuda_graph_max_tokens,
                          draft_model_path=a.speculative_draft_model_path, spec_steps=a.speculative_num_steps,
                          overlap=a.enable_overlap_schedule, context_length=a.context_length)
    runner = engine.runner
    dev, dt = runner.device, runner.dtype
    load_s = time.perf_counter() - t0
    model_cfg = runner.config
    timer = StepTimer(runner, _sync_fn(dev), overlapped=engine.overlap)
    rows = []
    for bs in a.batch_size:
        if not a.no_warmup:
            run_batch(engine, timer, bs, a.input_len, min(4, a.output_len), f"warm{bs}", seed=a.seed + 1)
        rows.append(run_batch(engine, timer, bs, a.input_len, a.output_len, f"bs{bs}", seed=a.seed))
    prof = None
    if a.profile:
        try:
            prof = profile_decode(engine, timer, a.batch_size[0], a.input_len, a.profile)
        except Exception as e:      # a profiling failure must not hide the timings
            prof = {"error": f"{type(e).__name__}: {e}"}
            print("profile failed:", prof["error"])
    prof_prompt = None
    if a.profile_prompt:
        try:
            prof_prompt = profile_decode(engine, timer, a.batch_size[0], a.input_len, a.profile_prompt,
                                         prompt_len=a.profile_prompt_len)
        except Exception as e:
            prof_prompt = {"error": f"{type(e).__name__}: {e}"}
            print("prompt-step profile failed:", prof_prompt["error"])
    from gemma4rt.worker.tp_worker import stop_tp_runner
    stop_tp_runner(engine.runner)
    del timer, runner, engine
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    bw = a.bandwidth_tbps * 1e12 if a.bandwidth_tbps else roofline.measure_copy_bandwidth(dev)
    ctx = a.input_len + a.output_len // 2
    elem = torch.empty((), dtype=dt).element_size()
    counts = roofline.parameter_counts(model_cfg)
    for r in rows:
        d = roofline.decode_bytes(model_cfg, ctx, r["batch_size"], elem, counts)
        r["bytes_per_step"] = d.total_bytes
        r["roofline_ms"] = d.min_step_ms(bw * a.tp) if bw else None
        r["bandwidth_fraction"] = r["roofline_ms"] / r["median_decode_ms"] if bw else None
    result = {"model": a.model_path, "load_format": a.load_format, "device": str(dev), "dtype": str(dt).split(".")[-1],
              "card": roofline.card_name() if dev.type == "cuda" else "cpu", "bandwidth": bw,
              "decode_context": ctx, "tp": a.tp, "load_s": load_s, "rows": rows, "profile": prof, "profile_prompt": prof_prompt,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.reference:
        try:
            ref = reference_decode(a.model_path, device=a.device, dtype=a.dtype, input_len=a.input_len,
                                   output_len=a.output_len, compile_forward=a.reference_compile, seed=a.seed)
            d1 = roofline.decode_bytes(model_cfg, ctx, 1, elem, counts)
            ref["bandwidth_fraction"] = d1.min_step_ms(bw) / ref["median_decode_ms"] if bw else None
        except Exception as e:     # the reference is a baseline; its failure must not hide our figures
            ref = {"error": f"{type(e).__name__}: {e}"}
        result["reference"] = ref
    print_report(result)
    if a.output_file:
        with open(a.output_file, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
    return result


def print_report(res: dict) -> None:
    bw = res["bandwidth"]
    print(f"model {res['model']} ({res['load_format']}), {res['device']} {res['dtype']}, card {res['card']}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s" if bw else f"model {res['model']}, {res['device']} {res['dtype']}")
    hdr = (f"{'bs':>4} {'in':>6} {'out':>5} {'prefill ms':>11} {'prefill tok/s':>14} {'decode ms (med)':>16} "
           f"{'engine ms':>10} {'decode tok/s':>13} {'roofline ms':>12} {'of limit':>9}")
    print(hdr)
    for r in res["rows"]:
        frac = f"{100 * r['bandwidth_fraction']:.0f}%" if r.get("bandwidth_fraction") else "n/a"
        roof = f"{r['roofline_ms']:.2f}" if r.get("roofline_ms") else "n/a"
        print(f"{r['batch_size']:>4} {r['input_len']:>6} {r['output_len']:>5} {r['prefill_latency_ms']:>11.2f} "
              f"{r['prefill_throughput']:>14.0f} {r['median_decode_ms']:>16.3f} {r['median_decode_engine_ms']:>10.3f} "
              f"{r['decode_throughput']:>13.1f} {roof:>12} {frac:>9}")
    b1 = next((r for r in res["rows"] if r["batch_size"] == 1), None)
    ref = res.get("reference")
    if b1:
        line = f"batch-1 TPOT at context ~{res['decode_context']}: ours {b1['median_decode_ms']:.3f} ms"
        if ref and "median_decode_ms" in ref:
            line += f", transformers {ref['median_decode_ms']:.3f} ms"
            if ref.get("bandwidth_fraction"):
                line += f" ({100 * ref['bandwidth_fraction']:.0f}% of limit)"
        elif ref:
            line += f", transformers failed: {ref.get('error')}"
        if b1.get("roofline_ms"):
            line += f", bandwidth limit {b1['roofline_ms']:.3f} ms ({100 * b1['bandwidth_fraction']:.0f}% reached)"
        print(line)


if __name__ == "__main__":
    main()
