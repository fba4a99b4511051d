"""A real `moelora serve` process on 127.0.0.1 for the server tests, and what they read from it:
Prometheus samples, the pool's pages and pins, the process's RSS, and /health latency measured
by a separate process (so that the test's own threads cannot slow the measurement)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

STALL_S = 0.1  # /health must answer within this, whatever else the server is doing


@contextlib.contextmanager
def yielding_cpu_to_server(niceness: int = 5):
    """Within the block, this (load-generating) process runs at a lower priority than the
    server's and the probe's; afterwards at its own again where the system permits raising it
    (as root), so that the tests after the block are not slowed."""
    before = os.nice(0)
    if before < niceness:
        os.nice(niceness - before)
    try:
        yield
    finally:
        try:
            os.nice(before - os.nice(0))
        except PermissionError:
            pass  # an unprivileged process cannot raise its priority again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra) -> dict:
    """The server subprocess imports the same moelora as this test process: the installed
    package in CI, the source tree (PYTHONPATH=python) in a developer build."""
    import moelora

    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(moelora.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


# Runs argv[2:] in place of itself, set to be killed when the process that started it dies (a
# test process killed by a timeout must not leave servers or pollers behind). The signal is
# armed before exec and survives it; argv[1] is the parent's pid, to catch a parent that died
# before the signal was armed.
_LAUNCHER = textwrap.dedent("""
    import ctypes, os, signal, sys
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(sys.argv[1]):
        sys.exit(70)
    os.execv(sys.argv[2], sys.argv[2:])
""")


def dies_with_this_process(argv: list[str]) -> list[str]:
    """`argv` (a program and its arguments) wrapped so that its process is killed as soon as
    this one dies, on Linux; unchanged elsewhere."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]


class ServerProcess:
    def __init__(self, args: list[str], env: dict, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the process's lifetime
        self.proc = subprocess.Popen(
            dies_with_this_process([sys.executable, "-m", "moelora.entrypoints.openai.api_server",
                                    *args, "--host", "127.0.0.1", "--port", str(self.port)]),
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def openai_server(args: list[str], env: dict, log_path: str, timeout: float = 120.0):
    """(ServerProcess, openai.OpenAI client for it) once the server is ready; stopped on exit."""
    import openai

    server = ServerProcess(args, env, log_path)
    try:
        server.wait_ready()
        yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                    timeout=timeout)
    finally:
        server.stop()


# -- /metrics ------------------------------------------------------------------------------------
def metrics(url: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample /metrics serves."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def pool_accounts(url: str) -> dict:
    samples = metrics(url)
    pages = {kind: value(samples, "moelora:pool_pages", kind=kind)
             for kind in ("kv", "adapter", "free", "pinned_adapter")}
    return {**pages, "total": value(samples, "moelora:pool_total_pages"),
            "kv_owners": value(samples, "moelora:pool_owners", kind="kv"),
            "in_flight": value(samples, "moelora:requests_in_flight"),
            "running": value(samples, "moelora:num_requests_running"),
            "waiting": value(samples, "moelora:num_requests_waiting")}


def wait_idle_and_exact(url: str, timeout: float = 20.0) -> dict:
    """Waits until nothing runs, then checks the pool's accounts are exact: no KV page, no
    KV owner and no pinned adapter page left, and every page free or an adapter's."""
    deadline = time.monotonic() + timeout
    while True:
        accounts = pool_accounts(url)
        idle = (accounts["kv"] == 0 and accounts["kv_owners"] == 0 and
                accounts["pinned_adapter"] == 0 and accounts["in_flight"] == 0 and
                accounts["running"] == 0 and accounts["waiting"] == 0)
        if idle:
            assert accounts["free"] + accounts["adapter"] == accounts["total"], accounts
            return accounts
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: {accounts}")
        time.sleep(0.05)


# -- /health latency from another process ---------------------------------------------------------
_POLLER = textwrap.dedent("""
    import json, os, sys, time, http.client
    port, out, period = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + float(sys.argv[4])
    pid = int(sys.argv[5])  # the server's

    def queued():
        # Seconds the server's threads have spent runnable but waiting for a CPU, summed: the
        # event loop's own waits, and those of a thread it waits for (the GIL's holder).
        total = 0
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return 0.0
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                pass
        return total / 1e9

    try:
        os.nice(-5)  # the probe itself should not wait for a CPU (where permitted)
    except OSError:
        pass
    latencies, cpu_waits, slow, failures = [], [], [], 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while time.monotonic() < deadline:  # or until the test asks it to stop
        try:
            with open(out + ".stop"):
                break
        except OSError:
            pass
        queued_before = queued()
        start = time.perf_counter()
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures += 1
        except Exception:
            failures += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        latencies.append(time.perf_counter() - start)
        cpu_waits.append(min(latencies[-1], max(0.0, queued() - queued_before)))
        if len(latencies) == 1:
            open(out + ".ready", "w").close()
        if latencies[-1] > 0.05:
            slow.append((time.time() - latencies[-1], latencies[-1]))
        time.sleep(period)
    with open(out, "w") as f:
        json.dump({"latencies": latencies, "cpu_waits": cpu_waits, "slow": slow,
                   "failures": failures}, f)
""")


class HealthPoller:
    """Polls /health every `period` s from a child process (its own interpreter and GIL) over
    one keep-alive connection; `stop()` returns the latencies and the failed polls. The load
    generators of the tests run at a lower priority (yielding_cpu_to_server), so that what is
    measured is the server, not a machine with more runnable threads than cores. The poller
    stops by itself after `lifetime` seconds, and dies with the test process. Use it in a
    `with` block (or call stop()) so that it never outlives its test."""

    def __init__(self, server: ServerProcess, workdir: str, period: float = 0.02,
                 lifetime: float = 900.0):
        self.out = os.path.join(workdir, f"health-{time.monotonic_ns()}.json")
        self.proc = subprocess.Popen(dies_with_this_process(
            [sys.executable, "-c", _POLLER, str(server.port), self.out, str(period),
             str(lifetime), str(server.proc.pid)]))
        deadline = time.monotonic() + 30
        while not os.path.exists(self.out + ".ready"):  # polling from now on
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("the /health poller did not start")
            time.sleep(0.01)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> dict:
        """The polls so far (idempotent: a second call returns the same): `latencies`,
        `cpu_waits` (per poll, what the server's threads waited for a CPU meanwhile, from
        /proc schedstat, at most the poll's time), `failures`, `max_s`, `max_own_s` and `max_cpu_wait_s`, `over_100ms`
        (polls whose own share is over STALL_S), and `slow`, (wall-clock start, seconds) of
        every poll over 50 ms, to match against what the server was doing then."""
        if self.proc.returncode is None:
            open(self.out + ".stop", "w").close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("the /health poller did not stop") from None
        with open(self.out) as f:
            result = json.load(f)
        latencies = sorted(result["latencies"])
        result["polls"] = len(latencies)
        result["max_s"] = latencies[-1] if latencies else 0.0
        # The server's own share of a poll: its time less what the server's threads spent
        # runnable but without a CPU (the machine's share: other processes' threads ran).
        own = [x - w for x, w in zip(result["latencies"], result["cpu_waits"])]
        result["max_own_s"] = max(own, default=0.0)
        result["max_cpu_wait_s"] = max(result["cpu_waits"], default=0.0)
        result["over_100ms"] = sum(1 for x in own if x > STALL_S)
        return result


def assert_no_stall(polled: dict, context=None) -> None:
    """No failed poll and none whose own share (its time less the server's threads' waits for
    a CPU) is over STALL_S. A machine with more than twice as many runnable threads as cores (a
    shared developer box) delays any process by that much, so there a slow poll is reported as
    a skip that says so, not as the server's failure."""
    assert polled["failures"] == 0, polled["failures"]
    if polled["over_100ms"] == 0:
        return
    load = os.getloadavg()[0]
    detail = (f"{polled['over_100ms']} of {polled['polls']} /health polls over "
              f"{STALL_S * 1000:.0f} ms of the server's own time (worst "
              f"{polled['max_own_s'] * 1000:.0f} ms; with waits for a CPU "
              f"{polled['max_s'] * 1000:.0f} ms, the longest wait "
              f"{polled['max_cpu_wait_s'] * 1000:.0f} ms)")
    if load > 2 * (os.cpu_count() or 1):
        pytest.skip(f"{detail} on an oversubscribed machine (load {load:.1f} on "
                    f"{os.cpu_count()} cores): not a measurement of the server")
    raise AssertionError(f"{detail}; {context() if callable(context) else context or ''}")
