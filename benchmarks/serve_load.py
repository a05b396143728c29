"""Load test of `bitdial serve`: many concurrent official OpenAI clients against one real server process.

    python benchmarks/serve_load.py ARTIFACT [--clients 32] [--requests 1000] [--max-tokens 8]
                                             [--max-queue 16] [--threads N] [--timeout 60]

Starts `bitdial serve ARTIFACT` on a free port, then --clients threads, each with its own `openai.OpenAI`
client (no retries), send --requests chat completions in all (every other one streamed; short replies).
Each request ends as served, refused (429, the queue is full; the client backs off --backoff s), a hang
(no answer within --timeout), or an error. The server's RSS is sampled (psutil) all along.

Prints a table and writes benchmarks/results/serve_load.json: the outcome counts, client latencies,
throughput, RSS over time and at every tenth of the requests, and the server's own /metrics counters.
The acceptance reading: no hangs, no errors, the server still answers /health, and the RSS after the
last tenth within a few percent of the RSS after the first tenth (memory flat).

Needs the [serve] extra, `openai` and `psutil`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROMPTS = ["Why is the sky blue?", "Name three colors.", "What is 2 + 2?", "Say hello.", "Write a haiku about CPUs."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


class RssSampler(threading.Thread):
    """Samples a process's resident set size every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.t0 = time.monotonic()
        self.stop = threading.Event()

    def rss_mb(self) -> float | None:
        try:
            return self.proc.memory_info().rss / 2**20
        except self.psutil.Error:  # the process is gone
            return None

    def run(self) -> None:
        while not self.stop.is_set():
            mb = self.rss_mb()
            if mb is not None:
                self.samples.append((time.monotonic() - self.t0, mb))
            self.stop.wait(self.interval)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="the server's compute threads")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer that count as a hang")
    ap.add_argument("--backoff", type=float, default=0.05, help="a refused client waits this long before its next request")
    ap.add_argument("--rss-interval", type=float, default=0.25)
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--out", default=str(ROOT / "results" / "serve_load.json"))
    a = ap.parse_args()

    import openai
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    port = free_port()
    cmd = [sys.executable, "-m", "bitdial", "serve", a.artifact, "--port", str(port), "--max-queue", str(a.max_queue),
           "--model-name", "bench", "--max-tokens-limit", str(max(a.max_tokens, 1))]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    log_path = Path(tempfile.gettempdir()) / f"serve_load-{os.getpid()}.server.log"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    rss = None
    try:
        t0 = time.monotonic()
        while http_get(base + "/health") is None:
            if server.poll() is not None:
                raise SystemExit(f"bitdial serve exited with {server.returncode}; see {log_path}")
            if time.monotonic() - t0 > a.startup_timeout:
                raise SystemExit(f"bitdial serve did not answer /health within {a.startup_timeout:.0f} s")
            time.sleep(0.2)
        err.print(f"server up in {time.monotonic() - t0:.1f} s on {base} (pid {server.pid})")
        rss = RssSampler(server.pid, a.rss_interval)
        rss.start()

        lock = threading.Lock()
        next_i = 0
        results: list[dict] = []
        milestones: list[dict] = []  # RSS after every tenth of the requests

        def worker(wid: int) -> None:
            nonlocal next_i
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=a.timeout)
            while True:
                with lock:
                    if next_i >= a.requests:
                        return
                    i = next_i
                    next_i += 1
                stream = i % 2 == 1
                msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                rec = {"i": i, "client": wid, "stream": stream}
                t = time.monotonic()
                try:
                    if stream:
                        n = 0
                        for ch in client.chat.completions.create(model="bench", messages=msgs, max_tokens=a.max_tokens,
                                                                 stream=True, stream_options={"include_usage": True}):
                            if ch.usage is not None:
                                n = ch.usage.completion_tokens
                        rec.update(outcome="served", tokens=n)
                    else:
                        r = client.chat.completions.create(model="bench", messages=msgs, max_tokens=a.max_tokens)
                        rec.update(outcome="served", tokens=r.usage.completion_tokens)
                except openai.RateLimitError:
                    rec["outcome"] = "refused_429"
                except openai.APITimeoutError:
                    rec["outcome"] = "hang"
                except Exception as e:  # noqa: BLE001 - every other failure is counted and shown
                    rec.update(outcome="error", error=f"{type(e).__name__}: {e}"[:300])
                rec["seconds"] = time.monotonic() - t
                with lock:
                    results.append(rec)
                    done = len(results)
                    if done % max(1, a.requests // 10) == 0:
                        milestones.append({"requests_done": done, "rss_mb": rss.rss_mb(),
                                           "t": time.monotonic() - rss.t0})
                if rec["outcome"] == "refused_429" and a.backoff > 0:
                    time.sleep(a.backoff)

        t_start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t_start
        health = http_get(base + "/health")
        metrics = parse_metrics(http_get(base + "/metrics") or "")
        rss.stop.set()
        rss.join()
    finally:
        if rss is not None:
            rss.stop.set()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    counts = {k: sum(r["outcome"] == k for r in results) for k in ("served", "refused_429", "hang", "error")}
    served = [r for r in results if r["outcome"] == "served"]
    lat = [r["seconds"] for r in served]
    tokens = sum(r.get("tokens", 0) for r in served)
    rss_vals = [mb for _, mb in rss.samples] if rss else []
    first = next((m["rss_mb"] for m in milestones if m["rss_mb"] is not None), None)
    last = milestones[-1]["rss_mb"] if milestones else None
    growth = (last - first) / first if first and last else None
    summary = {
        **counts, "requests": len(results), "server_alive_after": health is not None and '"ok"' in health,
        "wall_s": wall, "served_per_s": len(served) / wall if wall else None, "tokens_per_s": tokens / wall if wall else None,
        "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95), "latency_max_s": max(lat) if lat else None,
        "refused_latency_p95_s": pct([r["seconds"] for r in results if r["outcome"] == "refused_429"], 95),
        "rss_start_mb": rss_vals[0] if rss_vals else None, "rss_end_mb": rss_vals[-1] if rss_vals else None,
        "rss_max_mb": max(rss_vals) if rss_vals else None,
        "rss_growth_first_to_last_tenth": growth,
    }
    errors = sorted({r["error"] for r in results if r["outcome"] == "error"})[:10]

    t = Table(title=f"bitdial serve under load: {a.clients} clients, {a.requests} requests, max_tokens {a.max_tokens}, "
                    f"queue {a.max_queue}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    Console().print(t)
    if errors:
        err.print("[red]errors:[/]\n" + "\n".join(errors))

    meta = {"benchmark": "serve_load", "artifact": str(a.artifact), "clients": a.clients, "requests": a.requests,
            "max_tokens": a.max_tokens, "max_queue": a.max_queue, "threads": a.threads, "timeout_s": a.timeout,
            "backoff_s": a.backoff, "openai": openai.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    server_metrics = {k: v for k, v in metrics.items()
                      if k.startswith(("bitdial_requests_total", "bitdial_requests_cancelled_total",
                                       "bitdial_generated_tokens_total", "bitdial_decode_tokens_per_second",
                                       "bitdial_realized_bits", "bitdial_queue_depth"))}
    out = Path(a.out)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "errors": errors, "rss_milestones": milestones,
                               "rss_samples": [[round(t, 2), round(mb, 2)] for t, mb in (rss.samples if rss else [])],
                               "server_metrics": server_metrics}, indent=2))
    err.print(f"wrote {out} (server log: {log_path})")


if __name__ == "__main__":
    main()
