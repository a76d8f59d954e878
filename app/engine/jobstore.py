"""The job store: handles kept for /jobs, bounded in count, finished ones kept for a TTL, their results' memory
accounted for. Jobs outlive connections: only a DELETE, a deadline or the drain stops one."""

from __future__ import annotations

import time

from app.engine.errors import Overloaded
from app.engine.handle import FINISHED, RequestHandle
from app.metrics import Metrics

STATUSES = ("queued", "running", *FINISHED)


class JobStore:
    def __init__(self, max_jobs: int, ttl_seconds: float, metrics: Metrics) -> None:
        self.max_jobs, self.ttl = max_jobs, ttl_seconds
        self.metrics = metrics
        self._jobs: dict[str, RequestHandle] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def check_room(self) -> None:
        """Overloaded (429) when max_jobs unfinished and retained jobs are held."""
        self.sweep()
        if len(self._jobs) >= self.max_jobs:
            unfinished = sum(not h.finished for h in self._jobs.values())
            oldest = min((h.finished_at for h in self._jobs.values() if h.finished_at), default=None)
            retry = max(1.0, oldest + self.ttl - time.time()) if oldest and unfinished < self.max_jobs else 5.0
            raise Overloaded(f"the job store is full ({self.max_jobs} unfinished and retained jobs, DDIM_MAX_JOBS); "
                             f"fetch or delete finished jobs, or retry in {retry:.0f} s", retry)

    def add(self, handle: RequestHandle) -> None:
        """Keep a new job (after check_room)."""
        self._jobs[handle.id] = handle
        handle.on_finish.append(lambda _: self._gauges())
        self._gauges()

    def get(self, job_id: str, owner: str | None = None) -> RequestHandle | None:
        """The job, unless unknown, expired, or created by another owner (all alike: None)."""
        self.sweep()
        handle = self._jobs.get(job_id)
        return handle if handle is not None and handle.owner == owner else None

    def sweep(self) -> None:
        """Forget finished jobs older than the TTL."""
        cutoff = time.time() - self.ttl
        expired = [k for k, h in self._jobs.items() if h.finished_at is not None and h.finished_at < cutoff]
        for k in expired:
            del self._jobs[k]
        if expired:
            self._gauges()

    def _gauges(self) -> None:
        counts = dict.fromkeys(STATUSES, 0)
        for h in self._jobs.values():
            counts[h.status] += 1
        for status, n in counts.items():
            self.metrics.jobs.labels(status).set(n)
        self.metrics.job_result_bytes.set(sum(h.outcome.nbytes for h in self._jobs.values() if h.outcome))
