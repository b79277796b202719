"""One process works a chunk at a time: a lease on the chunk run that the working process renews.

    TTC_LEASE_S=60 ttc run recipes/SmolLM2-135M-Instruct/best_of_n.yaml --chunk 0 --num-chunks 2

The process that runs a chunk writes who it is (host, pid, Slurm task) and when it last renewed its
lease into the chunk run's tags, and renews it every quarter of the lease (TTC_LEASE_S seconds,
default 120) from a background thread. A second process for the same chunk is refused while the
lease is live, with who holds it and for how long. It takes over (and says so) once the holder is
gone: the lease expired (SIGKILL, a lost node), the holder's pid no longer runs on this host, or
the holder was this same Slurm array task before a requeue.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass

from .. import names
from . import store

log = logging.getLogger(__name__)

TAG_HOST, TAG_PID, TAG_TASK = names.TAG_LEASE_HOST, names.TAG_LEASE_PID, names.TAG_LEASE_TASK
TAG_STARTED, TAG_RENEWED = names.TAG_LEASE_STARTED, names.TAG_LEASE_RENEWED


class ChunkBusy(Exception):
    """Another live process holds the chunk's lease; nothing was run."""


MIN_LEASE_S = 2.0  # renewed every quarter: shorter would write a tag several times a second


def lease_s() -> float:
    """TTC_LEASE_S (default 120), checked: a word would kill the heartbeat thread and 0 would renew in a loop."""
    from ..config import RecipeError

    raw = os.environ.get("TTC_LEASE_S", "120")
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < MIN_LEASE_S:
        raise RecipeError(f"TTC_LEASE_S={raw!r}: expected the chunk lease in seconds, a number >= {MIN_LEASE_S:g} "
                          f"(default 120); unset it or set e.g. TTC_LEASE_S=120")
    return value


def slurm_task() -> str:
    """This process's Slurm array task (the same across a requeue), or ""."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID", "")


@dataclass
class Holder:
    host: str
    pid: int
    task: str
    started: float
    renewed: float

    @classmethod
    def of(cls, tags: dict[str, str]) -> "Holder | None":
        try:
            return cls(tags[TAG_HOST], int(tags[TAG_PID]), tags.get(TAG_TASK, ""), float(tags[TAG_STARTED]),
                       float(tags[TAG_RENEWED]))
        except (KeyError, ValueError):
            return None

    def gone_here(self) -> bool:
        """The holder ran on this host and its pid runs no more."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False

    def describe(self, now: float) -> str:
        task = f", Slurm task {self.task}" if self.task else ""
        return f"pid {self.pid} on {self.host}{task}, started {now - self.started:.0f} s ago"


def _mine(now: float) -> dict[str, str]:
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()), TAG_TASK: slurm_task(),
            TAG_STARTED: f"{now:.3f}", TAG_RENEWED: f"{now:.3f}"}


def acquire(run, rows: str) -> str | None:
    """Take the lease of chunk run `run` (an MLflow Run) or raise ChunkBusy. Returns what was taken
    over from whom, or None."""
    now = time.time()
    holder = Holder.of(run.data.tags) if run.info.status == "RUNNING" else None
    taken = None
    if holder is not None and holder.renewed > 0 and holder.pid != os.getpid():
        age = now - holder.renewed
        if holder.task and holder.task == slurm_task():
            taken = f"its Slurm task {holder.task} was requeued"
        elif holder.gone_here():
            taken = "that process is no longer running"
        elif age >= lease_s():
            taken = f"its lease expired {age - lease_s():.0f} s ago (renewed {age:.0f} s ago)"
        else:
            raise ChunkBusy(f"rows {rows} are being run by {holder.describe(now)} (run {run.info.run_id}; lease "
                            f"renewed {age:.0f} s ago, expires in {lease_s() - age:.0f} s): wait for it to finish, or "
                            f"stop it; a process that died is taken over once its lease expires")
        taken = f"taking over rows {rows} from {holder.describe(now)}: {taken}"
        log.warning("%s", taken)
    store.set_tags(run.info.run_id, _mine(now))
    time.sleep(store.SETTLE_S)  # two processes that started at once: the last writer holds it, the other sees so
    again = Holder.of(store.get_run(run.info.run_id).data.tags)
    if again is None or again.pid != os.getpid() or again.host != socket.gethostname():
        raise ChunkBusy(f"rows {rows}: {again.describe(time.time()) if again else 'another process'} started "
                        f"the same chunk at the same moment and holds it (run {run.info.run_id})")
    return taken


class Heartbeat:
    """Renews the lease every quarter of its length until stopped; `release` marks it free."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.every_s = lease_s() / 4  # read once, here: a bad value fails the caller, not the thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                store.set_tags(self.run_id, {TAG_RENEWED: f"{time.time():.3f}"})
            except Exception as err:  # a tracking server blip: the next beat tries again
                log.warning("could not renew the lease of run %s: %s", self.run_id, err)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        store.set_tags(self.run_id, {TAG_RENEWED: "0"})
