"""Submitting a recipe to Slurm: the parent run, an array job over its chunks, a dependent merge + evaluate.

    ttc launch recipes/Llama-3.2-1B-Instruct/best_of_n.yaml --chunks 8 --set n=16

Everything that can be wrong is checked before anything is submitted: the recipe, `--chunks`
against the number of problems, `sbatch` on PATH, the job scripts and the cluster file
(`slurm/cluster.sh`, the one place for partition, GPUs, time, account and environment), and the
tracking store, which must be a server that every node reaches (a SQLite file is refused). The
parent run is then created (or found), the resolved recipe is written next to the Slurm logs (the
tasks read that copy, so editing the recipe file later does not change a launched run), the array
job is submitted with one task per chunk, and the merge + evaluate job with `afterok` on it.

`--only-missing` submits only the chunks that have no finished chunk run under the parent (a task
killed part-way continues from its checkpoint), then merge + evaluate again.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .. import names
from ..config import Recipe, load_recipe, recipe_yaml
from ..data import chunk_bounds
from . import store

log = logging.getLogger(__name__)

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
CHUNK_SCRIPT = "chunks.sbatch"
MERGE_SCRIPT = "merge_evaluate.sbatch"
CLUSTER_FILE = "cluster.sh"
CLUSTER_ENV = "TTC_CLUSTER"  # path of the cluster file; the job scripts read it too
MOUNTS = "/proc/mounts"
# Filesystems another node reaches over the network (SQLite's locks do not hold there).
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
              "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "afs", "9p", "wekafs", "panfs", "pvfs2")
SERVER_SCHEMES = ("http", "https", "databricks", "postgresql", "mysql", "mssql")

START_SERVER = (
    "A cluster needs an MLflow tracking server (or another server-backed store such as postgresql://) "
    "that every node reaches. Start one on a machine the nodes can reach, with its SQLite file on that "
    "machine's local disk (the server is then its only writer; tasks upload artifacts through it):\n"
    "    mlflow server --app-name basic-auth --backend-store-uri sqlite:////<local-dir>/mlflow.db "
    "--artifacts-destination /<local-dir>/artifacts --host 0.0.0.0 --port 5000 --allowed-hosts \"$(hostname):5000\"\n"
    "(basic-auth: it listens on the network; see the README's \"Securing the tracking server\"), then, where "
    "you launch:\n"
    "    export MLFLOW_TRACKING_URI=http://<that-hostname>:5000 MLFLOW_TRACKING_USERNAME=... "
    "MLFLOW_TRACKING_PASSWORD=..."
)


class LaunchError(Exception):
    """Nothing was submitted; the message says which input is wrong and what is expected."""


@dataclass
class Launch:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    num_chunks: int
    problems: int
    chunks: list[int]  # the chunk indices submitted
    array_job: str | None  # None when no chunk was missing
    merge_job: str
    log_dir: Path
    recipe_copy: Path
    finished_before: list[int] = field(default_factory=list)


def launch(recipe_path: str, overrides: list[str], chunks: int, *, only_missing: bool = False,
           sbatch_args: list[str] = (), merge_sbatch_args: list[str] = (), max_parallel: int | None = None,
           log_dir: str | Path = "slurm-logs", parent_run_id: str | None = None,
           cluster_file: str | Path | None = None) -> Launch:
    recipe = _recipe(recipe_path, overrides, parent_run_id)
    if chunks < 1:
        raise LaunchError(f"--chunks={chunks} must be at least 1 (one Slurm array task per chunk)")
    if max_parallel is not None and max_parallel < 1:
        raise LaunchError(f"--max-parallel={max_parallel} must be at least 1 (array tasks running at once)")
    total = len(_problems(recipe))
    if chunks > total:
        raise LaunchError(f"--chunks={chunks} is larger than the {total} problems of {recipe.dataset_name}"
                          + (f" (num_samples={recipe.num_samples})" if recipe.num_samples else "")
                          + f"; use at most {total}")
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch is not on PATH: run `ttc launch` on a Slurm login node (or load the Slurm module)")
    squeue = shutil.which("squeue") if only_missing else None
    if only_missing and squeue is None:
        raise LaunchError("--only-missing asks squeue which chunks are still queued, but squeue is not on PATH")
    cluster = Path(cluster_file or os.environ.get(CLUSTER_ENV) or SLURM_DIR / CLUSTER_FILE).resolve()
    chunk_opts, merge_opts = cluster_options(cluster)
    scripts = [SLURM_DIR / CHUNK_SCRIPT, SLURM_DIR / MERGE_SCRIPT]
    for script in scripts:
        if not script.is_file():
            raise LaunchError(f"job script {script} not found (install ttc_mlops from its repository: pip install -e .)")
    uri = store.tracking_uri()
    check_store(uri)
    store.check_parent_run(recipe)

    experiment_id = store.ensure_experiment(store.experiment_for(recipe))
    parent = store.find_or_create_parent(recipe, experiment_id)
    bounds = [chunk_bounds(total, i, chunks) for i in range(chunks)]
    finished = finished_chunks(parent, bounds)
    todo = [i for i in range(chunks) if i not in finished] if only_missing else list(range(chunks))
    if finished and not only_missing:
        log.info("%d of %d chunks already finished under parent %s: their tasks will skip them "
                 "(--only-missing submits only the others)", len(finished), chunks, parent)
    chunk_name, merge_name = f"ttc-chunks-{parent[:12]}", f"ttc-merge-{parent[:12]}"
    if only_missing:
        live = sorted(set(queued_tasks(chunk_name)) & set(todo))
        if live:
            raise LaunchError(f"chunks {live} of parent {parent} are still queued or running "
                              f"(squeue --name={chunk_name}); wait for them or scancel them, then --only-missing again")

    out = Path(log_dir).resolve() / parent
    out.mkdir(parents=True, exist_ok=True)
    recipe_copy = out / "recipe.yaml"
    recipe_copy.write_text(recipe_yaml(recipe.model_copy(update={"parent_run_id": None})))
    env = {**os.environ, CLUSTER_ENV: str(cluster)}

    array_job = None
    if todo:
        array = array_spec(todo) + (f"%{max_parallel}" if max_parallel else "")
        array_job = submit([f"--job-name={chunk_name}", f"--array={array}", f"--output={out}/%x_%A_%a.out",
                            *chunk_opts, *sbatch_args, str(scripts[0]), str(recipe_copy), str(chunks), parent], env)
    after = [f"--dependency=afterok:{array_job}", "--kill-on-invalid-dep=yes"] if array_job else []
    try:
        merge_job = submit([f"--job-name={merge_name}", *after, f"--output={out}/%x_%j.out",
                            *merge_opts, *merge_sbatch_args, str(scripts[1]), parent], env)
    except LaunchError:
        if array_job:  # never leave chunks running without the job that merges them
            subprocess.run(["scancel", array_job], check=False)
        raise
    return Launch(parent, experiment_id, uri, chunks, total, todo, array_job, merge_job, out, recipe_copy,
                  sorted(finished))


def _recipe(path: str, overrides: list[str], parent_run_id: str | None) -> Recipe:
    recipe = load_recipe(path, [*overrides, *([f"parent_run_id={parent_run_id}"] if parent_run_id else [])])
    for key in ("chunk", "num_chunks", "dataset_start", "dataset_end"):
        if getattr(recipe, key) is not None:
            raise LaunchError(f"{key}={getattr(recipe, key)} is set (by {path} or --set): `ttc launch` splits the problems "
                              f"itself (--chunks); remove it (num_samples limits the problem set)")
    return recipe


def _problems(recipe: Recipe) -> list:
    from .run_chunk import preflight

    # The login node checks everything but the accelerator: vLLM's GPU check belongs to the nodes.
    return preflight(recipe.model_copy(update={"backend": "transformers"}))


def cluster_options(path: Path) -> tuple[list[str], list[str]]:
    """The sbatch options of the chunk tasks and of the merge job, as the cluster file's bash arrays
    CHUNK_SBATCH=(...) and MERGE_SBATCH=(...) define them."""
    if not path.is_file():
        raise LaunchError(f"cluster file {path} not found (set {CLUSTER_ENV} or pass --cluster-file; "
                          f"{SLURM_DIR / CLUSTER_FILE} is the template)")
    reader = ('set -eu; source "$1" >&2; '
              'printf "%s\\0" "${#CHUNK_SBATCH[@]}" "${CHUNK_SBATCH[@]}" "${#MERGE_SBATCH[@]}" "${MERGE_SBATCH[@]}"')
    done = subprocess.run(["bash", "-c", reader, "cluster", str(path)], capture_output=True, text=True)
    if done.returncode:
        raise LaunchError(f"cluster file {path} must be bash defining the arrays CHUNK_SBATCH=(...) and "
                          f"MERGE_SBATCH=(...): {done.stderr.strip()}")
    values = done.stdout.split("\0")[:-1]
    n_chunk = int(values[0])
    return values[1 : 1 + n_chunk], values[2 + n_chunk :]


def check_store(uri: str) -> None:
    """The tracking store must be a server every node reaches: refuse files, probe http(s)."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=10) as reply:
                if reply.status != 200:
                    raise LaunchError(f"MLFLOW_TRACKING_URI={uri} answers {health} with HTTP {reply.status}, not 200. "
                                      + START_SERVER)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LaunchError(f"MLFLOW_TRACKING_URI={uri} is not reachable ({reason}). " + START_SERVER) from None
        if parsed.hostname in ("127.0.0.1", "localhost", "::1"):
            log.warning("MLFLOW_TRACKING_URI=%s is this machine's loopback: only tasks on this node reach it", uri)
        return
    if scheme in SERVER_SCHEMES:
        return
    if scheme in ("sqlite", "file", ""):
        # sqlite:///rel.db and sqlite:////abs.db; file:///abs; a bare path
        path = Path(uri.split("sqlite:///", 1)[-1] if scheme == "sqlite" else parsed.path if scheme else uri)
        mount, fstype = mount_of(path.expanduser().resolve())
        if fstype in NETWORK_FS or fstype.startswith("nfs"):
            raise LaunchError(f"MLFLOW_TRACKING_URI={uri} is a {'SQLite' if scheme == 'sqlite' else 'file'} store on a "
                              f"network filesystem ({fstype} mounted at {mount}): tasks writing it at once from "
                              f"several nodes lock each other out or corrupt it (its file locks do not hold over "
                              f"the network). " + START_SERVER)
        raise LaunchError(f"MLFLOW_TRACKING_URI={uri} is a {'SQLite' if scheme == 'sqlite' else 'file'} store on "
                          f"this machine's disk ({fstype} at {mount}): tasks on other nodes cannot write to it. "
                          + START_SERVER)
    raise LaunchError(f"MLFLOW_TRACKING_URI={uri}: scheme {scheme!r} is not a store a cluster can share "
                      f"(expected one of {', '.join(SERVER_SCHEMES)}). " + START_SERVER)


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) of the longest mount point above `path`."""
    best = ("/", "unknown")
    for line in Path(MOUNTS).read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[0]):
            best = (mount, parts[2])
    return best


def finished_chunks(parent_id: str, bounds: list[tuple[int, int]]) -> set[int]:
    """Indices of the chunks (rows `bounds[i]`) that have a finished chunk run under the parent."""
    runs = store.chunk_runs(parent_id)
    wanted = {f"{s}:{e}" for s, e in bounds}
    stray = sorted({r.data.tags.get(names.TAG_ROWS) for r in runs} - wanted)
    if stray:
        raise LaunchError(f"parent run {parent_id} has chunk runs for rows {stray}, which a split into "
                          f"{len(bounds)} chunks does not produce ({sorted(wanted)}); launch with the --chunks "
                          f"of the first launch so finished chunks are reused")
    done = {r.data.tags.get(names.TAG_ROWS) for r in runs if r.info.status == "FINISHED"}
    return {i for i, (s, e) in enumerate(bounds) if f"{s}:{e}" in done}


def queued_tasks(job_name: str) -> list[int]:
    """Array task ids of this job name that are pending or running (one line per task with -r)."""
    done = subprocess.run(["squeue", "-h", "-r", f"--name={job_name}", "-o", "%K"], capture_output=True, text=True)
    if done.returncode:
        raise LaunchError(f"squeue failed (exit {done.returncode}): {done.stderr.strip()}")
    return [int(x) for x in done.stdout.split() if x.isdigit()]


def array_spec(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (Slurm's --array syntax)."""
    parts, run = [], [indices[0]]
    for i in indices[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            parts.append(run)
            run = [i]
    parts.append(run)
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)


def submit(args: list[str], env: dict[str, str]) -> str:
    """sbatch --parsable ARGS; returns the job id."""
    cmd = ["sbatch", "--parsable", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise LaunchError(f"sbatch failed (exit {done.returncode}): {done.stderr.strip()}\n  command: {shlex.join(cmd)}")
    job = done.stdout.strip().split(";")[0]
    log.info("submitted job %s: %s", job, shlex.join(cmd))
    return job
