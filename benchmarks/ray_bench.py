"""The Ray Serve path against the direct server, on the same model and load (docs/ray.md, docs/benchmarks.md).

Five services, each under the same closed-loop loads (C clients, each sending its next seeded /generate n, S as
.npy when the last is answered): the direct server (ddim-serve, T threads); ddim-serve-ray with 1 replica x T
threads and with T replicas x 1 thread, on a local Ray cluster this script starts (loopback only); and, to isolate
the Ray path's own cost from thread scheduling, the direct server and 1 replica with 1 thread each. Throughput is
the engines' own count of sample-steps (ddim_sample_steps_total, summed over the replicas' internal doors) over a
window of whole forwards, so it does not depend on which requests happen to finish inside the window. Each round
starts every service afresh, in turn, so that a machine's drift falls on all of them; the ratios are per round.

    python -m benchmarks.ray_bench      # 3 rounds of 40 s windows; part of `make bench` when ray is installed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.format import fmt, git_commit
from benchmarks.load import edge_window, steps_at
from harness.server import ray_serve_process, server_process

ROOT = Path(__file__).resolve().parents[1]
RAY_JSON = ROOT / "benchmarks" / "ray.json"
PINS = {"DDIM_DTYPE": "float32", "DDIM_CHANNELS_LAST": "false", "DDIM_MAX_BATCH_SIZE": "64", "DDIM_LOG_JSON": "false"}
# (label, replicas, threads each); replicas None is the direct server
PAIRS = {"ray 1xT / direct": ("ray 1xT", "direct"), "ray Tx1 / direct": ("ray Tx1", "direct"),
         "ray Tx1 / ray 1xT": ("ray Tx1", "ray 1xT"), "ray 1x1 / direct 1 thread": ("ray 1x1", "direct 1 thread")}


def services(threads: int) -> list[tuple[str, int | None, int]]:
    out: list[tuple[str, int | None, int]] = [("direct", None, threads), ("ray 1xT", 1, threads),
                                              ("ray Tx1", threads, 1)]
    if threads > 1:
        out += [("direct 1 thread", None, 1), ("ray 1x1", 1, 1)]
    return out


@contextmanager
def serving(store: Path, replicas: int | None, threads: int,
            ray_env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """The direct server (replicas None) or `ddim-serve-ray` with its own local cluster, on a free loopback port;
    yields (its URL, the pid under which all its processes run) once it serves."""
    env = {**PINS, "DDIM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if replicas is None:
        with server_process(store, **env) as (url, proc):
            yield url, proc.pid
    else:
        args = ["--model-store", str(store), "--replicas", str(replicas), "--num-cpus", str(threads)]
        with ray_serve_process(args, {**env, **ray_env}) as (url, proc):
            yield url, proc.pid  # the cluster it started (raylet, workers) runs under it


def step_counter(url: str, client: httpx.Client) -> Callable[[], float]:
    """Sample-steps computed so far by every engine behind url: each Ray replica's (found as Prometheus finds them,
    at /metrics/targets), or the direct server's own. With several replicas, a window's edges are whole forwards
    of one of them: the others' partial forwards are within one batch each."""
    targets = client.get(f"{url}/metrics/targets", timeout=30)
    doors = [f"http://{t['targets'][0]}" for t in targets.json()] if targets.status_code == 200 else [url]
    return lambda: sum(steps_at(door, client) for door in doors)


def measure(url: str, clients: int, seconds: float, body: dict[str, Any], warmup: float) -> dict[str, Any]:
    """Closed-loop load from `clients` threads; sample-steps/s over about `seconds` of whole forwards after the
    warm-up, and the clients' own images/s, median latency and errors over the same time."""
    stop = threading.Event()
    done: list[tuple[float, float, str]] = []  # (finished at, latency, replica)
    errors: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"accept": "application/x-npy"}) as c:
            k = 0
            while not stop.is_set():
                t0 = time.monotonic()
                k += 1
                try:
                    r = c.post("/generate", json={**body, "seed": 100_000 * i + k})
                except httpx.HTTPError as e:  # counted, and the client goes on
                    errors.append(type(e).__name__)
                    continue
                if r.status_code == 200:
                    done.append((time.monotonic(), time.monotonic() - t0, r.headers.get("x-replica-id", "")))
                else:
                    errors.append(str(r.status_code))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(warmup)
        with httpx.Client() as metrics:
            start = time.monotonic()
            steps_per_s = edge_window(step_counter(url, metrics), seconds, poll=0.02)
            end = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join()
    window = [(lat, rid) for at, lat, rid in done if start <= at <= end]
    return {"sample_steps_per_s": steps_per_s, "images_per_s": len(window) * body["n"] / (end - start),
            "p50_s": statistics.median(lat for lat, _ in window) if window else None,
            "replicas_seen": len({rid for _, rid in window}), "errors": len(errors), "error_kinds": sorted(set(errors))}


def cpu_seconds(root: int, name: str) -> float:
    """CPU time so far of root's process tree's processes whose command line starts with name (Linux /proc)."""
    parent, cmdline, cpu = {}, {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        pid = int(stat.parent.name)
        parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def under_root(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parent.get(pid, 0)
        return False

    return sum(t for pid, t in cpu.items() if cmdline.get(pid, b"").startswith(name.encode()) and under_root(pid))


def per_request_cost(url: str, root: int, path: str, processes: dict[str, str], clients: int,
                     seconds: float) -> dict[str, float]:
    """The path's own cost: `clients` closed-loop GETs of path (no model work) for `seconds`; requests/s, and the
    CPU milliseconds per request of each named process under root."""
    stop, count = threading.Event(), [0] * clients

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                c.get(path).raise_for_status()
                count[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    before = {k: cpu_seconds(root, v) for k, v in processes.items()}
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, n = time.monotonic() - start, sum(count)
    return {"requests_per_s": n / elapsed,
            **{f"{k}_cpu_ms_per_request": 1000 * (cpu_seconds(root, v) - before[k]) / n
               for k, v in processes.items()}}


def ratios(rounds: list[dict[str, dict[str, dict[str, Any]]]], load: str) -> dict[str, list[float]]:
    """Per round, each pair's ratio of sample-steps/s under one load."""
    out: dict[str, list[float]] = {}
    for name, (top, bottom) in PAIRS.items():
        out[name] = [r[top][load]["sample_steps_per_s"] / r[bottom][load]["sample_steps_per_s"]
                     for r in rounds if top in r and bottom in r]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="T: the threads of one direct server")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--steps", default="10,50", help="one load per S")
    p.add_argument("--seconds", type=float, default=40.0, help="measurement window per service and load")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ray-env", default="", help="extra environment for ddim-serve-ray, e.g. RAY_worker_niceness=0")
    p.add_argument("--only", help="these services only, e.g. 'direct,ray 1xT' (labels as in the output)")
    p.add_argument("--cost-seconds", type=float, default=15.0, help="GET load for the per-request cost (0: skip)")
    p.add_argument("--out", default=str(RAY_JSON))
    a = p.parse_args(argv)
    store, t = Path(a.model_store), a.threads
    ray_env = dict(kv.split("=", 1) for kv in a.ray_env.split(",") if kv)
    loads = {f"S={s}": {"model": a.model, "n": a.n, "steps": int(s), "eta": 0.0} for s in a.steps.split(",")}
    out: dict[str, Any] = {"commit": git_commit(ROOT), "cpus": os.cpu_count(), "threads": t, "args": vars(a),
                           "loads": loads, "rounds": []}

    def save() -> None:  # after every round: a run cut short keeps what it measured
        out["ratios"] = {name: ratios(out["rounds"], name) for name in loads}
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")

    for i in range(a.rounds):
        out["rounds"].append({})
        for label, replicas, threads in services(t):
            if a.only and label not in a.only.split(","):
                continue
            with serving(store, replicas, threads, ray_env) as (url, _):
                out["rounds"][i][label] = {}
                for name, body in loads.items():
                    r = measure(url, a.clients, a.seconds, body, a.warmup)
                    if r["replicas_seen"] != (replicas or 1) or r["errors"]:
                        print(f"WARNING: {label} {name}: {r['replicas_seen']} replicas answered, {r['errors']} "
                              f"errors {r['error_kinds']}", flush=True)
                    out["rounds"][i][label][name] = r
                    print(f"round {i + 1} {label} {name}: {r}", flush=True)
        save()
    if a.cost_seconds:  # one thread, one replica: the path's own CPU per request, without model work
        cost = out["per_request_cost"] = {}
        with serving(store, None, 1, ray_env) as (url, root):
            cost["direct"] = per_request_cost(url, root, "/readyz", {"server": sys.executable}, 4, a.cost_seconds)
        with serving(store, 1, 1, ray_env) as (url, root):
            ray_processes = {"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica",
                             "directory": "ray::JobDirectory"}
            cost["ray"] = per_request_cost(url, root, "/readyz", ray_processes, 4, a.cost_seconds)
            job = httpx.post(f"{url}/jobs/generate", json={"model": a.model, "steps": 1}, timeout=60).json()["id"]
            cost["ray job reads"] = per_request_cost(url, root, f"/jobs/{job}", ray_processes, 4, a.cost_seconds)
        print(f"per-request cost: {cost}", flush=True)
    save()
    print(json.dumps(out["ratios"], indent=1))
    return out


def report_lines(path: Path = RAY_JSON) -> list[str]:
    """docs/benchmarks.md's section for ray.json (none if it was not measured)."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    t, loads, a = r["threads"], list(r["loads"]), r["args"]
    commit = str(r["commit"])[:10] + ("-dirty" if str(r["commit"]).endswith("-dirty") else "")
    lines = ["", "## Scale-out: the Ray Serve path against the direct server (`python -m benchmarks.ray_bench`)", "",
             f"Model {a['model']}, {a['clients']} closed-loop clients, n = {a['n']}, η = 0, float32; "
             f"{len(r['rounds'])} rounds, each starting every service afresh in turn; sample-steps/s counted by the "
             f"engines over {a['seconds']:.0f} s of whole forwards; T = {t} threads on {r['cpus']} cores "
             f"(commit {commit}). Ratios: per round, then their mean. Goal for the Ray path over the "
             "direct server: ≥ 0.9.", "",
             "| service | " + " | ".join(f"{s}: sample-steps/s (images/s, p50 s)" for s in loads) + " |",
             "|---|" + "---|" * len(loads)]
    for label, replicas, threads in services(t):
        if label not in r["rounds"][0]:
            continue
        name = (f"direct server, {threads} thread{'s' * (threads > 1)}" if replicas is None else
                f"Ray, {replicas} replica{'s' * (replicas > 1)} × {threads} thread{'s' * (threads > 1)}")
        cells = []
        for s in loads:
            xs = [rd[label][s] for rd in r["rounds"]]
            cells.append(f"{statistics.mean(x['sample_steps_per_s'] for x in xs):.0f} "
                         f"({statistics.mean(x['images_per_s'] for x in xs):.2f}, "
                         f"{statistics.mean(x['p50_s'] for x in xs):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio of sample-steps/s | " + " | ".join(loads) + " |", "|---|" + "---|" * len(loads)]
    for pair in PAIRS:
        per = [r["ratios"][s].get(pair, []) for s in loads]
        if not all(per):
            continue
        shown = pair.replace("1xT", f"1×{t}").replace("Tx1", f"{t}×1").replace("ray", "Ray")
        lines.append(f"| {shown} | " + " | ".join(
            f"**{statistics.mean(xs):.3f}** ({', '.join(fmt(x, 3) for x in xs)})" for xs in per) + " |")
    cost = r.get("per_request_cost")
    if cost:
        d, ray = cost["direct"], cost["ray"]
        lines += ["", f"The path's own cost, without model work (closed-loop `GET /readyz` from 4 clients for "
                  f"{a['cost_seconds']:.0f} s, 1 thread, 1 replica): the direct server answers "
                  f"{d['requests_per_s']:.0f} requests/s at {d['server_cpu_ms_per_request']:.2f} ms of its CPU each; "
                  f"through Ray {ray['requests_per_s']:.0f} requests/s, at {ray['proxy_cpu_ms_per_request']:.2f} ms "
                  f"of the proxy's CPU and {ray['replica_cpu_ms_per_request']:.2f} ms of the replica's per request."]
        jobs = cost.get("ray job reads")
        if jobs:
            lines[-1] += (f" Job reads (`GET /jobs/{{id}}`, one job-directory call each): {jobs['requests_per_s']:.0f} "
                          f"requests/s, the directory actor at {jobs['directory_cpu_ms_per_request']:.2f} ms of CPU "
                          "per read.")
    return [*lines, ""]


if __name__ == "__main__":
    main()
