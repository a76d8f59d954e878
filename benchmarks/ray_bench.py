"""The Ray Serve path against the direct server, on the same model and load (docs/ray.md).

Three services, each under the same closed-loop load (C clients, each sending /generate n, S, seeded, as .npy):
the direct server (ddim-serve, T threads), ddim-serve-ray with 1 replica x T threads, and ddim-serve-ray with T
replicas x 1 thread, on a local Ray cluster this script starts (loopback only). Prints images/s for each and the
ratios; `--rounds` alternates the services, so that a machine's drift falls on all of them.

    python -m benchmarks.ray_bench --seconds 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from harness.server import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def ray_server(store: Path, replicas: int, threads: int, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    environ = {**os.environ, **env, "DDIM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT)}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-ray-bench-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.distributed.cli", "--model-store", str(store), "--replicas",
                             str(replicas), "--num-cpus", str(threads), "--port", str(port)],
                            env=environ, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(log.read()[-3000:])
            log.seek(0)
            if "ddim-serve-ray: serving on" in log.read():  # after serve.run: every replica is up
                break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # SIGTERM: the CLI deletes the app and stops the cluster it started
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def load(url: str, clients: int, seconds: float, body: dict[str, float], warmup: float = 3.0) -> dict[str, float]:
    """Closed loop: each client sends its next request when the last is answered; images/s after the warm-up."""
    done: list[tuple[float, int, str]] = []
    start = time.monotonic()
    end = start + warmup + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300, headers={"accept": "application/x-npy"}) as c:
            k = 0
            while time.monotonic() < end:
                r = c.post("/generate", json={**body, "seed": 1000 * i + k})
                k += 1
                if r.status_code == 200:
                    done.append((time.monotonic(), int(body["n"]), r.headers.get("x-replica-id", "")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counted = [(at, n, rid) for at, n, rid in done if start + warmup <= at <= end]
    return {"images_per_s": sum(n for _, n, _ in counted) / seconds, "replicas_seen": len({r for *_, r in counted})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-store", default=str(ROOT / "model_store"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    store, t = Path(args.model_store), args.threads
    pins = {"DDIM_DTYPE": "float32", "DDIM_CHANNELS_LAST": "false", "DDIM_LOG_JSON": "false"}
    body: dict[str, float] = {"n": args.n, "steps": args.steps, "eta": 0.0}
    # (label, replicas, threads each): None replicas is the direct server
    services = [("direct", None, t), (f"ray 1x{t}", 1, t), (f"ray {t}x1", t, 1)]
    if t > 1:  # the Ray path's own cost, without threads: 1 thread each
        services += [("direct 1 thread", None, 1), ("ray 1x1", 1, 1)]
    results: dict[str, list[float]] = {label: [] for label, *_ in services}
    for _ in range(args.rounds):
        for label, replicas, threads in services:
            if replicas is None:
                context = running_server(store, plain=True, DDIM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                                         DDIM_MAX_BATCH_SIZE="64")
            else:
                context = ray_server(store, replicas, threads, pins)
            with context as url:
                r = load(url, args.clients, args.seconds, body)
            assert replicas is None or r["replicas_seen"] == replicas, r
            results[label].append(r["images_per_s"])
            print(label, r, flush=True)
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    report: dict[str, object] = {"load": {**body, "clients": args.clients, "seconds": args.seconds,
                                          "rounds": args.rounds}, "images_per_s": results, "mean": mean}
    for label in mean:
        if label.startswith("ray"):
            base = "direct 1 thread" if label == "ray 1x1" and t > 1 else "direct"
            report[f"{label} / {base}"] = mean[label] / mean[base]
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
