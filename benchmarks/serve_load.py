"""``onestep serve`` under load: N concurrent clients generate for T seconds against 127.0.0.1; p50 / p95 latency per
method; and the latency of a request after A abandoned ones. Writes benchmarks/results/serve-load.{json,md}.

    python benchmarks/serve_load.py [--run DIR ...] [--clients 8] [--duration 30] [--k 3] [--abandon 40]

The server is ``onestep serve`` in its own process on a free port of 127.0.0.1 (the same runs as ``--run`` gives
it; without ``--run`` the shipped ones). Each client loops for ``--duration`` seconds: POST /api/generate with a
random class and seed, read the whole stream. Two latencies per method:

- server: the latency the page shows, measured on the server around the method's own work (the network calls run one
  at a time under the server's lock, so this is compute time, not time spent sharing the CPU);
- client, end to end: from sending the request to the stream's last line, queueing for the lock included; with N
  clients and one model lock this grows about N-fold.

Errors (a non-200 answer, an "error" event, a stream without "done", a connection failure) are counted; the run
checks that the server process is still alive at the end.

Abandoned requests (before the load): the end-to-end latency of one whole request (the median of 3), then
``--abandon`` generate requests whose client reads the first line and hangs up, then the latency of the next request
(the median of 3). The server cancels the work of a client that went away, so the two match; a server that finished
every abandoned request first would make the next one wait for all of them (one teacher stream each).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import provenance, write_results  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, linear interpolation between order statistics."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def start_server(runs: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "onestep", "serve", "--host", "127.0.0.1", "--port", "0"]
    for r in runs:
        cmd += ["--run", r]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    log = []
    for line in proc.stdout:
        log.append(line.rstrip())
        if "http://" in line:
            url = line.split()[2].rstrip("/")
            threading.Thread(target=lambda: [log.append(x.rstrip()) for x in proc.stdout], daemon=True).start()
            return proc, url, log
    raise RuntimeError("onestep serve exited before printing its URL:\n" + "\n".join(log))


def one_request(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/api/generate", data=data, headers={"Content-Type": "application/json"},
                                 method="POST")
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=120) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        last = None
        for line in r:
            if not line.strip():
                continue
            ev = json.loads(line)
            if ev["type"] == "image" and first is None:
                first = time.perf_counter() - t0
            if ev["type"] == "error":
                raise RuntimeError(ev["error"])
            last = ev
    if last is None or last["type"] != "done":
        raise RuntimeError("the stream ended without a done event")
    return {"e2e_s": time.perf_counter() - t0, "first_image_s": first, "latency_s": last["latency_s"]}


def abandon(url: str, body: dict) -> None:
    """POST /api/generate, read the stream's first line, hang up."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    conn.getresponse().readline()
    conn.close()


def abandoned_requests(url: str, body: dict, n: int, repeats: int = 3) -> dict:
    """End-to-end latency of a whole request before and right after ``n`` abandoned ones (medians of ``repeats``)."""
    before = statistics.median(one_request(url, body)["e2e_s"] for _ in range(repeats))
    t0 = time.perf_counter()
    for _ in range(n):
        abandon(url, body)
    abandon_s = time.perf_counter() - t0
    after = [one_request(url, body)["e2e_s"] for _ in range(repeats)]
    return {"abandoned": n, "request_before_ms": 1000 * before, "next_request_after_ms": 1000 * after[0],
            "median_after_ms": 1000 * statistics.median(after), "abandoning_s": abandon_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], metavar="DIR", help="passed to onestep serve (repeatable)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds each client keeps generating")
    ap.add_argument("--k", type=int, default=3, help="DD2's teacher steps in the DD2 + k panel")
    ap.add_argument("--abandon", type=int, default=40, help="generate requests abandoned after their first line "
                    "before the next request is timed (0 = skip)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve-load"))
    args = ap.parse_args()

    proc, url, log = start_server(args.run)
    with urllib.request.urlopen(url + "/api/info", timeout=30) as r:
        info = json.loads(r.read())
    body_k = {"k": args.k} if info["k_max"] else {}
    abandoned = abandoned_requests(url, {"class": 0, "seed": 0, **body_k}, args.abandon) if args.abandon else None
    results, errors = [], []
    lock = threading.Lock()
    t_end = time.time() + args.duration

    def client(i: int) -> None:
        rnd = random.Random(i)
        while time.time() < t_end:
            body = {"class": rnd.randrange(info["num_classes"]), "seed": rnd.randrange(2 ** 31), **body_k}
            try:
                res = one_request(url, body)
                with lock:
                    results.append(res)
            except (OSError, RuntimeError, ValueError, urllib.error.URLError) as e:
                with lock:
                    errors.append(f"client {i}: {type(e).__name__}: {e}")

    load_before = os.getloadavg()
    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    load_after = os.getloadavg()
    alive = proc.poll() is None
    with urllib.request.urlopen(url + "/api/info", timeout=30) as r:  # the server still answers after the load
        still_serving = r.status == 200
    proc.terminate()
    proc.wait(30)

    panels = {p["key"]: p for p in info["panels"]}
    if "dd2-k" in panels:
        panels["dd2-k"] = {**panels["dd2-k"], "steps": 1 + args.k, "label": f"DD2, 1 step + {args.k} teacher steps"}
    rows = []
    for key, p in panels.items():
        lat = [r["latency_s"][key] for r in results if key in r["latency_s"]]
        if not lat:
            continue
        rows.append({"method": p["label"], "key": key, "steps": p["steps"], "n": len(lat),
                     "server_p50_ms": 1000 * pct(lat, 0.5), "server_p95_ms": 1000 * pct(lat, 0.95),
                     "server_mean_ms": 1000 * statistics.fmean(lat)})
    e2e = [r["e2e_s"] for r in results]
    first = [r["first_image_s"] for r in results if r["first_image_s"] is not None]
    client_rows = [{"what": "whole request (all panels, teacher streamed)", "n": len(e2e),
                    "p50_ms": 1000 * pct(e2e, 0.5) if e2e else None, "p95_ms": 1000 * pct(e2e, 0.95) if e2e else None},
                   {"what": "first image on the client", "n": len(first),
                    "p50_ms": 1000 * pct(first, 0.5) if first else None,
                    "p95_ms": 1000 * pct(first, 0.95) if first else None}]
    result = {**provenance(), "clients": args.clients, "duration_s": args.duration, "wall_s": wall,
              "requests": len(results), "requests_per_s": len(results) / wall, "errors": len(errors),
              "error_samples": errors[:10], "server_alive_after": alive and still_serving,
              "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load_after,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": info["runs"], "missing": info["missing"], "k": args.k if body_k else None,
              "server_latency": rows, "client_latency": client_rows,
              "abandoned_requests": [abandoned] if abandoned else [], "server_log": log[:10],
              "protocol": "server latency: measured around each method's own work under the server's model lock "
                          "(what the page shows); client latency: end to end, queueing for that lock included; "
                          "abandoned requests: one whole request end to end (median of 3) before and right after "
                          "--abandon requests whose client hung up after the first line"}
    result["summary"] = {k: result[k] for k in ("clients", "duration_s", "requests", "requests_per_s", "errors",
                                                 "server_alive_after", "omp_num_threads",
                                                 "load_average_1_5_15_before", "load_average_1_5_15_after")}
    write_results(args.out, result, f"onestep serve under load: {args.clients} clients for {args.duration:g} s")
    print(json.dumps({k: result[k] for k in ("requests", "errors", "server_alive_after", "server_latency",
                                             "client_latency", "abandoned_requests")}, indent=1))
    if errors or not result["server_alive_after"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
