"""`python -m benchmarks.studies.idle_model`: does an idle second model slow the busy one (issue 24)?

Three servers of the bundled fashion-mnist, in alternating order each round, each fresh: the model alone; the store
as shipped (fashion-mnist busy, fashion-mnist-flow idle); and the store as shipped with DDIM_RELEASE_IDLE_THREADS=false
(the idle model keeps its OpenMP team, as before the fix). Each is measured against its own raw forward loop in
paired slices (benchmarks/paired.py), and the server's threads' CPU is read from /proc under load: libgomp throttles
its barrier spinning once its threads outnumber the cores (app/startup/openmp.py), which shows as compute threads
below 100 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.load import Background
from benchmarks.paired import paired_round
from benchmarks.serving import serve, server_facts, server_pid
from benchmarks.studies import HERE, save_study

ROOT = Path(__file__).resolve().parents[2]


def _store(names: list[str]) -> Path:
    store = Path(tempfile.mkdtemp()) / "store"
    store.mkdir()
    for name in names:
        (store / name).symlink_to((ROOT / "model_store" / name).resolve())
    return store


def thread_cpu(pid: int, seconds: float) -> list[float]:
    """Each busy thread's share of a core over seconds (threads above 2 %), highest first."""
    def snap() -> dict[str, int]:
        out = {}
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
                out[t] = int(fields[11]) + int(fields[12])
            except OSError:
                continue
        return out

    a = snap()
    time.sleep(seconds)
    b = snap()
    hz = os.sysconf("SC_CLK_TCK")
    shares = sorted(((b[t] - a[t]) / hz / seconds for t in b if t in a), reverse=True)
    return [round(s, 3) for s in shares if s > 0.02]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.idle_model", description=__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=str(HERE / "idle_model.json"))
    a = p.parse_args(argv)
    both = _store(["fashion-mnist", "fashion-mnist-flow"])
    configs: dict[str, tuple[Path, dict[str, str]]] = {
        "fashion-mnist alone": (_store(["fashion-mnist"]), {}),
        "store as shipped": (both, {}),
        "store as shipped, idle team kept": (both, {"DDIM_RELEASE_IDLE_THREADS": "false"})}
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    for r in range(a.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            store, env = configs[name]
            with serve(store, a.batch, **env) as url:
                facts, pid = server_facts(url), server_pid(url)
                with Background(url, {"n": 1, "steps": a.steps}, 2 * a.batch):
                    time.sleep(3)
                    cpu = thread_cpu(pid, 4)
                out = paired_round(url, pid, store, ROOT / "model_store" / "fashion-mnist", a.batch, facts, True,
                                   lambda: 1.0, a.steps, 2, 3.0, 4.0)
                rounds[name].append({"served": out["served"], "limit": out["limit"],
                                     "served_over_limit": out["served_over_limit"], "thread_cpu": cpu[:3],
                                     "dtype": facts["dtype"], "channels_last": facts["channels_last"]})
                print(name, rounds[name][-1], flush=True)
    summary = {k: statistics.median(x["served_over_limit"] for x in v) for k, v in rounds.items()}
    return save_study(vars(a), ROOT, rounds=rounds, served_over_limit=summary)


if __name__ == "__main__":
    main()
