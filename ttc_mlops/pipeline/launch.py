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

`--serve-prm` runs the PRM once for the whole sweep (docs/served.md, "One PRM server for a Slurm
sweep"): a server job (slurm/serve_prm.sbatch, `vllm serve PRM --runner pooling` on a free port of
its node, options SERVE_SBATCH of the cluster file) is submitted first; once the server answers
/health it writes its address (http://host:port) to `prm-server.url` in the log directory. Every
array task is queued at once, waits (`ttc wait-server`, bounded, failing at once if the server job
has ended) until that file names a healthy server, and runs with `prm_base_url` set to it, so the
tasks may land on any node. The merge job stops the server when it ends (an EXIT trap), and a
one-line job depending on the merge job (`afterany`) stops it where the merge never runs (a failed
chunk cancels it).
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
SERVE_SCRIPT = "serve_prm.sbatch"
SERVER_FILE = "prm-server.url"  # in the log directory: the PRM server's address, once it is healthy
SERVER_FILE_ENV, SERVER_JOB_ENV = "TTC_PRM_SERVER_FILE", "TTC_PRM_SERVER_JOB"  # what the job scripts read
SERVER_WAIT_S = 3600  # how long a task waits for the PRM server (a GPU node may queue a while)
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
    server_job: str | None = None  # the PRM server's job (--serve-prm)
    stop_job: str | None = None  # the job that stops it after the merge job


def launch(recipe_path: str, overrides: list[str], chunks: int, *, only_missing: bool = False,
           sbatch_args: list[str] = (), merge_sbatch_args: list[str] = (), max_parallel: int | None = None,
           log_dir: str | Path = "slurm-logs", parent_run_id: str | None = None,
           cluster_file: str | Path | None = None, serve_prm: bool = False, serve_args: list[str] = (),
           server_wait_s: int = SERVER_WAIT_S) -> Launch:
    recipe = _recipe(recipe_path, overrides, parent_run_id)
    if serve_prm:
        _check_servable(recipe)
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
    serve_opts = serve_options(cluster, chunk_opts) if serve_prm else []
    scripts = [SLURM_DIR / CHUNK_SCRIPT, SLURM_DIR / MERGE_SCRIPT] + ([SLURM_DIR / SERVE_SCRIPT] if serve_prm else [])
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

    server_job = None
    if serve_prm and todo:
        from ..prm.remote import serve_command

        server_file = out / SERVER_FILE
        server_file.unlink(missing_ok=True)  # a previous launch's server is gone
        server_job = submit([f"--job-name=ttc-prm-{parent[:12]}", f"--output={out}/%x_%j.out", *serve_opts,
                             str(scripts[2]), str(server_file), *serve_command(recipe.prm_path, dtype=recipe.dtype),
                             *serve_args], env)
        env = {**env, SERVER_FILE_ENV: str(server_file), SERVER_JOB_ENV: server_job,
               "TTC_PRM_SERVER_WAIT": str(server_wait_s)}
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
        for job in (array_job, server_job):  # never leave chunks or a server running without the merge job
            if job:
                subprocess.run(["scancel", job], check=False)
        raise
    stop_job = None
    if server_job:  # the merge job stops the server as it ends; where it never runs, this does
        stop_job = submit([f"--job-name=ttc-prm-stop-{parent[:12]}", f"--dependency=afterany:{merge_job}",
                           f"--output={out}/%x_%j.out", *merge_opts, f"--wrap=scancel {server_job}"], env)
    return Launch(parent, experiment_id, uri, chunks, total, todo, array_job, merge_job, out, recipe_copy,
                  sorted(finished), server_job, stop_job)


def _check_servable(recipe: Recipe) -> None:
    """--serve-prm: the recipe runs its PRM here (no prm_base_url of its own, no prm_backend:
    transformers) in a family vLLM runs."""
    import dataclasses

    from ..prm import prm_backend

    if recipe.prm_base_url:
        raise LaunchError(f"--serve-prm starts a PRM server for the sweep, but the recipe already sets "
                          f"prm_base_url={recipe.prm_base_url!r}; drop one of them")
    if recipe.prm_backend == "transformers":
        raise LaunchError("--serve-prm runs the PRM on a vLLM server, but prm_backend='transformers' runs it in every "
                          "task; drop one of them")
    prm_backend(dataclasses.replace(recipe.prm_settings, base_url="http://<the --serve-prm job>"))


def serve_options(path: Path, chunk_opts: list[str]) -> list[str]:
    """The PRM server job's sbatch options: the cluster file's SERVE_SBATCH=(...), else the chunk
    tasks' (the server needs the accelerator a task would)."""
    reader = ('set -eu; source "$1" >&2; if declare -p SERVE_SBATCH >/dev/null 2>&1; then '
              'printf "%s\\0" "${SERVE_SBATCH[@]}"; else printf "unset\\0"; fi')
    done = subprocess.run(["bash", "-c", reader, "cluster", str(path)], capture_output=True, text=True)
    if done.returncode:
        raise LaunchError(f"cluster file {path}: {done.stderr.strip()}")
    values = done.stdout.split("\0")[:-1]
    return list(chunk_opts) if values == ["unset"] else values


def wait_for_server(url_file: str | Path, job: str | None, timeout: float, poll: float = 2.0) -> str:
    """The PRM server's URL once `url_file` names it and its /health answers 200; a LaunchError when
    the server job `job` has left the queue first, or after `timeout` seconds."""
    import time

    path, deadline = Path(url_file), time.monotonic() + timeout
    while True:
        url = path.read_text().strip() if path.is_file() else ""
        if url:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return url
            except (urllib.error.URLError, OSError):
                pass
        if job and not _queued(job):
            raise LaunchError(f"PRM server job {job} ended before it served at {url or '(no address written)'}: "
                              f"see its log next to {path}")
        if time.monotonic() > deadline:
            raise LaunchError(f"no healthy PRM server in {path} after {timeout:.0f} s "
                              f"({'it names ' + url if url else 'no address written yet'}; job {job})")
        time.sleep(poll)


def _queued(job: str) -> bool:
    """Whether Slurm still lists the job (pending or running); True where squeue cannot say."""
    if shutil.which("squeue") is None:
        return True
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    if done.returncode:
        return "Invalid job id" not in done.stderr  # an ended job leaves the queue
    return any(state not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT") for state in done.stdout.split())


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
