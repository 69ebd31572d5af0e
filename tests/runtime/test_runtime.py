"""Actor base, msgspec frames, and the no-ML import rule of the CPU rooms."""
import asyncio
import subprocess
import sys

from gemma4rt.protocol import (
    AddRequest, EngineReady, NewRequestData, RequestOutput, SampledTokens, SamplingParams,
    ScheduledRequest, SchedulerStats, StepPlan, StepResult, TokenOutputs,
)
from gemma4rt.runtime.actor import Actor
from gemma4rt.runtime.mailbox import SocketChannel, decode_body, encode_frame


def test_frames_roundtrip():
    sp = SamplingParams(max_new_tokens=3, seed=5, logit_bias={7: 1.5})
    msgs = [
        AddRequest(rid="a", prompt_token_ids=[1, 2, 3], sampling=sp),
        StepPlan(step_id=1, new_requests=[NewRequestData(rid="a", token_ids=[1], num_prompt_tokens=1, sampling=sp,
                                                         pages={"full": [0, -1]})],
                 scheduled=[ScheduledRequest(rid="a", start=0, num_tokens=1, new_pages={}, sample=True)],
                 removed_rids=["b"]),
        StepResult(step_id=1, sampled=[SampledTokens(rid="a", token_ids=[4], logprobs=[-0.1],
                                                     top_logprobs=[[(4, -0.1)]])]),
        TokenOutputs(outputs=[RequestOutput(rid="a", new_token_ids=[4], finish_reason="stop", matched_stop=4)]),
        SchedulerStats(num_running=1, num_waiting=0, pool_usage={"full": 0.5}, pool_pages={"full": 8}),
        EngineReady(model_info={"name": "m"}, pool_pages={"full": 8}, pool_page_size={"full": 16},
                    tokenizer_path="/t"),
    ]
    for m in msgs:
        f = encode_frame(m)
        n = int.from_bytes(f[:4], "big")
        assert n == len(f) - 4
        assert decode_body(f[4], f[5:]) == m


def test_socket_channel_and_actor(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        got = []
        done = asyncio.Event()

        class Sink(Actor):
            def __init__(self):
                super().__init__("sink")
                self.handlers = {TokenOutputs: self.on_out}

            async def on_out(self, m):
                got.append(m)
                if len(got) == 3:
                    done.set()

        sink = Sink()
        sink.start()

        async def on_conn(r, w):
            ch = SocketChannel(r, w)
            while (m := await ch.recv()) is not None:
                sink.send(m)
        server = await asyncio.start_unix_server(on_conn, path)
        r, w = await asyncio.open_unix_connection(path)
        ch = SocketChannel(r, w)
        for i in range(3):
            ch.send(TokenOutputs(outputs=[RequestOutput(rid=str(i), new_token_ids=list(range(i)))]))
        await ch.drain()
        await asyncio.wait_for(done.wait(), 5)
        await sink.stop()
        assert sink.stopped.is_set()
        ch.close()
        server.close()
        return got
    got = asyncio.run(main())
    assert [m.outputs[0].rid for m in got] == ["0", "1", "2"]
    assert got[2].outputs[0].new_token_ids == [0, 1]


def test_cpu_rooms_import_no_ml():
    code = ("import sys, gemma4rt.scheduler, gemma4rt.runtime.actor, gemma4rt.runtime.mailbox, "
            "gemma4rt.runtime.process, gemma4rt.engine, gemma4rt.cli, gemma4rt.worker.noop_runner; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_actor_takes_in_a_big_frame_within_a_few_steps(tmp_path):
    """A request carrying megabytes of pixels reaches a busy engine in a few steps, not one socket
    chunk per step (the transport reads one chunk per loop turn)."""
    import time

    from gemma4rt.runtime.engine_proc import READ_LIMIT, EngineActor

    class BusyEngine:
        def __init__(self):
            self.steps, self.added_at = 0, None

        def add_request(self, m):
            if m.rid == "big":
                self.added_at = self.steps

        def has_work(self):
            return self.added_at is None and self.steps < 20000

        def step(self):
            self.steps += 1
            time.sleep(0.0005)                 # a GPU step holds the loop
            return TokenOutputs(outputs=[])

        def stats(self):
            return SchedulerStats(num_running=1, num_waiting=0, pool_usage={}, pool_pages={})

    async def main():
        from gemma4rt.runtime.mailbox import pump
        path = str(tmp_path / "e.sock")
        accepted = asyncio.Queue()

        async def on_conn(r, w):
            await accepted.put(SocketChannel(r, w))
        server = await asyncio.start_unix_server(on_conn, path)
        r, w = await asyncio.open_unix_connection(path, limit=READ_LIMIT)
        eng = BusyEngine()
        actor = EngineActor(eng, SocketChannel(r, w))
        actor.start()
        pump_task = asyncio.get_running_loop().create_task(pump(actor.channel, actor))
        front = await accepted.get()
        actor.send(AddRequest(rid="warm", prompt_token_ids=[1], sampling=SamplingParams()))   # start stepping
        await asyncio.sleep(0.05)
        start = eng.steps
        assert start > 0
        front.send(AddRequest(rid="big", prompt_token_ids=list(range(2_000_000)), sampling=SamplingParams()))
        await front.drain()
        for _ in range(5000):
            if eng.added_at is not None:
                break
            await asyncio.sleep(0.001)
        pump_task.cancel()
        await actor.stop()
        server.close()
        return eng.added_at, start

    added_at, start = asyncio.run(main())
    assert added_at is not None, "the big request never arrived"
    assert added_at - start <= 5, f"took {added_at - start} steps"
