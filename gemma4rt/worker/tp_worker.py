"""Tensor-parallel ranks: rank 0's runner lives in the engine process (or the offline LLM's process) and
starts ranks 1..N-1 as processes of their own, one per GPU. Each rank loads its shard of the weights
(model/parallel.py) and its share of the KV heads; rank 0 sends every step plan down one pipe per rank
(msgpack), all ranks run the forward pass (NCCL all-reduces inside it on CUDA, gloo on the CPU), rank 0
samples and sends the sampled token ids, which the other ranks append to their copy of the batch. A CPU
(gloo) group settles the KV pool sizes at start-up.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch

from gemma4rt.config import EngineConfig
from gemma4rt.model.parallel import TP

log = logging.getLogger(__name__)
INIT_TIMEOUT = timedelta(minutes=30)      # loading a big checkpoint on every rank takes a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, init_method: str, device_type: str, pipe=None) -> TP:
    import torch.distributed as dist
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=INIT_TIMEOUT)
    ctrl = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return TP(rank=rank, size=size, group=dist.group.WORLD, ctrl=ctrl, pipe=pipe)


def _follower_main(rank: int, size: int, init_method: str, cfg: EngineConfig, device_type: str,
                   log_level: int, pipe) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    from gemma4rt.runtime.engine_proc import set_parent_death_signal
    set_parent_death_signal()
    from gemma4rt.worker.model_runner import ModelRunner
    tp = _join(rank, size, init_method, device_type, pipe)
    try:
        runner = ModelRunner(cfg, tp)
        while runner.follow():
            pass
    except BaseException:
        log.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)          # rank 0's next collective fails instead of waiting for this rank
    _leave(runner)
    logging.shutdown()
    os._exit(0)              # (not the interpreter's teardown, which could wait on a group left hanging)


# the runner's attributes that hold device memory (or pinned host memory), dropped by free_runner_memory
_HEAVY = ("kv", "model", "sampler", "drafter", "mm_cache", "ple_host_table", "_ple_pinned", "_last_sampled",
          "_open", "_step_ctx", "_step_hidden")


def free_runner_memory(runner) -> None:
    """Give back what a (rank-0 or single) runner holds on its device: its CUDA graphs first (their pools),
    then the KV pools, the weights, the sampler's buffers and the per-step state, and empty torch's cache.
    The runner cannot step afterwards. Without this the memory stays until the garbage collector breaks the
    runner's reference cycles, and a new runner sizing its KV pools from the free memory would find little."""
    import gc
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        runner.graphs = None
        graphs.release()
    for name in _HEAVY:
        if getattr(runner, name, None) is not None:
            setattr(runner, name, None)
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _leave(runner, timeout: float = 10.0) -> None:
    """Leave the process group. Over NCCL the communicators are aborted, not destroyed: with NCCL work
    captured in CUDA graphs, destroy_process_group hangs in ncclCommDestroy (pytorch/pytorch#115388; seen
    here on two H200s: rank 1 waited there while rank 0 waited for rank 1 to exit), and an abort waits for
    no peer. The graphs are freed first all the same, and the wait is bounded so that shutting down
    cannot wedge. (gloo, the CPU path: an ordinary destroy.)"""
    import gc
    import threading

    import torch.distributed as dist
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        runner.graphs = None
        graphs.release()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)

    def leave():
        if dist.get_backend() == "nccl" and abort is not None:
            try:
                abort()
                return
            except Exception as e:       # (a private API: should it change, destroy as before)
                log.warning("aborting the tensor-parallel process group: %s; destroying it instead", e)
        dist.destroy_process_group()

    t = threading.Thread(target=leave, name="gemma4rt-tp-leave", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("leaving the tensor-parallel process group: no answer after %.0f s; going on", timeout)


def start_tp_runner(cfg: EngineConfig):
    """Start ranks 1..N-1 and return rank 0's ModelRunner."""
    import multiprocessing as mp
    from gemma4rt.worker.model_runner import ModelRunner, resolve_device
    n = cfg.parallel.tp
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"--tp {n} needs {n} GPUs, this machine shows {torch.cuda.device_count()}")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(1, n)]       # (read end, write end): step messages
    procs = [ctx.Process(target=_follower_main, name=f"gemma4rt-tp{r}", daemon=True,
                         args=(r, n, init_method, cfg, device.type, logging.getLogger().getEffectiveLevel(),
                               pipes[r - 1][0]))
             for r in range(1, n)]
    for p in procs:
        p.start()
    for rd, _ in pipes:
        rd.close()                  # the children hold the read ends
    tp = _join(0, n, init_method, device.type, [wr for _, wr in pipes])
    runner = ModelRunner(cfg, tp)
    runner.tp_procs = procs
    log.info("tensor parallel: %d ranks (%s)", n, "NCCL" if device.type == "cuda" else "gloo")
    return runner


def stop_tp_runner(runner, timeout: float = 30.0) -> None:
    """Let ranks 1..N-1 of rank 0's `runner` return from their step loop, wait for them, and leave the
    process group (a no-op for a runner without ranks). A rank already gone is logged, not raised."""
    procs = getattr(runner, "tp_procs", None)
    if not procs:
        return
    runner.tp_procs = []
    import threading
    try:
        runner.stop_followers()
    except Exception as e:
        log.warning("stopping the tensor-parallel ranks: %s", e)
    # every rank leaves the group at the same time (rank 0 waiting for the others to exit first, while
    # they wait in destroy_process_group, was a hang)
    leave = threading.Thread(target=_leave, args=(runner,), name="gemma4rt-tp-stop", daemon=True)
    leave.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            log.warning("tensor-parallel rank %s did not stop within %.0f s: killed", p.name, timeout)
            p.kill()
    leave.join(timeout)
