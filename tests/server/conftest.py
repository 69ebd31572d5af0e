"""Real server processes (`python -m gemma4rt.server`) on free ports, shared per module."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    def __init__(self, *args: str, api_key=None, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "gemma4rt.server", "--port", str(self.port), "--log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gemma4rt-test-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"server did not start: {self.logs()}")
        kids = children(self.proc.pid)
        self.engine_pid = kids[0] if kids else None

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes = None, timeout=60):
        h = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if self.api_key:
            h.setdefault("Authorization", f"Bearer {self.api_key}")
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def load(self) -> dict:
        return json.loads(self.get("/get_load")[1])

    def wait_idle(self, timeout=15.0) -> dict:
        t_end = time.time() + timeout
        d = {}
        while time.time() < t_end:
            d = self.load()
            if d.get("num_open_requests") == 0 and d.get("num_running") == 0 and d.get("num_waiting") == 0 \
                    and all(u == 0 for u in d.get("pool_usage", {}).values()):
                return d
            time.sleep(0.1)
        raise AssertionError(f"server not idle: {d}")

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.engine_pid and alive(self.engine_pid):
            os.kill(self.engine_pid, signal.SIGKILL)
        self.log.close()


NOOP = ["--runner", "noop", "--context-length", "65536", "--max-total-tokens", "262144", "--page-size", "16",
        "--max-running-requests", "96", "--max-queued-requests", "64", "--enable-metrics",
        "--max-request-bytes", "200000", "--reasoning-parser", "gemma4", "--tool-call-parser", "gemma4"]
# the shared noop server schedules as the server does on a GPU by default (overlap scheduling; the noop
# runner has no GPU, so it is asked for); GEMMA4RT_TEST_SERVER_ARGS adds flags, e.g.
# --disable-overlap-schedule to run the server suites synchronously
NOOP += ["--enable-overlap-schedule"] + os.environ.get("GEMMA4RT_TEST_SERVER_ARGS", "").split()


@pytest.fixture(scope="session")
def server():
    s = Server(*NOOP)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)


@pytest.fixture(scope="session")
def loose_client(server):
    """Non-strict client: the SDK types legacy-completion stream chunks with a non-null
    finish_reason (and echo logprobs without nulls), which real OpenAI streams do not satisfy."""
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
