"""Runs survive crashes and concurrency: real processes, real signals, a real SQLite store.

    python -m pytest -q -m e2e tests/test_faults.py

The chunk processes are tests/chunk_worker.py (run_chunk with scripted models that take a set time
per generate call), so what is tested is the pipeline: the store, the lease, the signals, the
checkpoint.
"""

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tracking_at

from ttc_mlops import names
from ttc_mlops.pipeline import store

pytestmark = pytest.mark.e2e

WORKER = Path(__file__).parent / "chunk_worker.py"


def worker(experiment: str, chunk: int = 0, num_chunks: int = 1, delay: float = 0.0, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), experiment, str(chunk), str(num_chunks), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or os.environ.copy())


def chunk_runs(experiment: str) -> list:
    exp = store.client().get_experiment_by_name(experiment)
    if exp is None:
        return []
    return store.client().search_runs([exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def checkpointed(experiment: str) -> bool:
    runs = chunk_runs(experiment)
    return bool(runs) and bool(store.client().list_artifacts(runs[0].info.run_id, names.RECORDS_DIR))


def test_four_chunks_at_once_on_a_new_store_lose_nothing(tmp_path, monkeypatch):
    """No pre-migrated template: the store is created by the chunks themselves, at once."""
    for trial in range(3):
        uri = f"sqlite:///{tmp_path}/fresh-{trial}.db"
        with tracking_at(uri, monkeypatch, tmp_path):
            procs = [worker("race", c, 4) for c in range(4)]
            results = [p.communicate(timeout=300) for p in procs]
            assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in results]
            runs = chunk_runs("race")
            assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
            assert sorted(len(store.load_records(r.info.run_id, names.chunk_artifact(*map(int, r.data.tags[names.TAG_ROWS]
                                                                                    .split(":"))))) for r in runs) == [2] * 4
            parents = {r.data.tags[names.TAG_PARENT] for r in runs}
            assert len(parents) == 1  # one parent, though four processes looked for it at once


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_terminated_chunk_is_failed_with_its_checkpoint_kept(mlflow_store, sig):
    proc = worker("term", delay=1.0)
    wait_for(lambda: checkpointed("term"), "checkpoint")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-1500:]
    [run] = chunk_runs("term")
    assert run.info.status == "FAILED" and run.data.tags[names.TAG_STOPPED_BY] == sig.name
    saved = store.load_records(run.info.run_id, names.chunk_artifact(0, 8))
    assert 2 <= len(saved) < 8
    again = worker("term")  # resumes from the checkpoint
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and f"resumed_from={len(saved)}" in out, err[-1500:]


def test_a_live_chunk_is_refused_and_a_dead_ones_taken_over(mlflow_store):
    first = worker("lease", delay=4.0)  # 16 s of work: still running when the others start
    wait_for(lambda: checkpointed("lease"), "checkpoint")
    second = worker("lease")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1 and f"pid {first.pid} on {socket.gethostname()}" in err and "lease renewed" in err
    first.send_signal(signal.SIGKILL)
    first.wait()
    [run] = chunk_runs("lease")
    assert run.info.status == "RUNNING"  # SIGKILL: nothing could mark it
    third = worker("lease")  # the same host, the holder's pid is gone: taken over at once
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0 and "resumed_from=" in out, err[-1500:]
    assert f"taking over rows 0:8 from pid {first.pid}" in err and "no longer running" in err
    [run] = chunk_runs("lease")
    assert run.info.status == "FINISHED"


def test_a_lease_from_a_lost_node_is_honoured_until_it_expires(mlflow_store):
    """A holder on another host cannot be asked whether it lives: its lease decides."""
    first = worker("node", delay=0.5)
    wait_for(lambda: checkpointed("node"), "checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait()
    [run] = chunk_runs("node")
    lost = {names.TAG_LEASE_HOST: "gpu-node-17"}
    # renewed just now, a 600 s lease: still held however long the worker takes to start
    store.set_tags(run.info.run_id, {**lost, names.TAG_LEASE_RENEWED: f"{time.time():.3f}"})
    refused = worker("node", env={**os.environ, "TTC_LEASE_S": "600"})
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "gpu-node-17" in err, err[-1500:]
    # renewed 10 s ago, a 3 s lease: expired
    store.set_tags(run.info.run_id, {**lost, names.TAG_LEASE_RENEWED: f"{time.time() - 10:.3f}"})
    taken = worker("node", env={**os.environ, "TTC_LEASE_S": "3"})
    out, err = taken.communicate(timeout=120)
    assert taken.returncode == 0 and "its lease expired" in err and "gpu-node-17" in err, err[-1500:]


def test_a_corrupt_checkpoint_keeps_what_it_can_and_recomputes_the_rest(mlflow_store, tmp_path):
    proc = worker("corrupt", delay=1.0)
    wait_for(lambda: len(store.load_records_tolerant(chunk_runs("corrupt")[0].info.run_id, names.chunk_artifact(0, 8))[0]
                         or []) >= 4 if chunk_runs("corrupt") else False, "two checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [run] = chunk_runs("corrupt")
    name = names.chunk_artifact(0, 8)
    good = store.load_records(run.info.run_id, name)
    # cut the checkpoint mid-way through its last record, as a crash during an upload would
    lines = [line for line in gzip.decompress(Path(store.client().download_artifacts(
        run.info.run_id, f"{names.RECORDS_DIR}/{name}", str(tmp_path))).read_bytes()).decode().splitlines()]
    broken = tmp_path / "broken" / name
    broken.parent.mkdir()
    broken.write_bytes(gzip.compress(("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]).encode()))
    store.client().log_artifact(run.info.run_id, str(broken), names.RECORDS_DIR)

    again = worker("corrupt")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-2000:]
    assert f"record file {names.RECORDS_DIR}/{name} of run {run.info.run_id} is corrupt at line {len(good)}" in err
    assert f"keeping the {len(good) - 1} records before it" in err and f"resumed_from={len(good) - 1}" in out
    [run] = chunk_runs("corrupt")
    assert run.info.status == "FINISHED" and len(store.load_records(run.info.run_id, name)) == 8
