"""The job directory: job id -> the replica that owns it (its id, internal address and first state), and the live
replicas' internal addresses (for forwarding, and for Prometheus to scrape each replica).

It runs as one named, detached Ray actor per application (deployment.py creates it with ray.remote), so it outlives
any replica; this module itself does not import Ray.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


class JobDirectory:
    def __init__(self, max_entries: int = 100_000, max_age_seconds: float = 2 * 3600.0) -> None:
        self.max_entries, self.max_age = max_entries, max_age_seconds
        self._jobs: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._replicas: dict[str, tuple[float, str]] = {}  # id -> (last heard of, address)

    def register(self, job_id: str, entry: dict[str, Any]) -> None:
        self._jobs[job_id] = (time.monotonic(), entry)
        self._sweep()

    def lookup(self, job_id: str) -> dict[str, Any] | None:
        found = self._jobs.get(job_id)
        return None if found is None else found[1]

    def add_replica(self, replica_id: str, address: str) -> None:
        """A replica's heartbeat (every HEARTBEAT_SECONDS, deployment.py)."""
        self._replicas[replica_id] = (time.monotonic(), address)

    def remove_replica(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def replicas(self, max_silence_seconds: float = 15.0) -> dict[str, str]:
        """Replica id -> internal address, of the replicas heard of lately (one that died is dropped)."""
        cutoff = time.monotonic() - max_silence_seconds
        return {k: address for k, (seen, address) in self._replicas.items() if seen >= cutoff}

    def _sweep(self) -> None:
        """Forget the oldest entries past the bound, and those older than any job's result can live."""
        cutoff = time.monotonic() - self.max_age
        while self._jobs and (len(self._jobs) > self.max_entries or next(iter(self._jobs.values()))[0] < cutoff):
            self._jobs.popitem(last=False)
