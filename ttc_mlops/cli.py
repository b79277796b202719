"""The `ttc` command: validate and run recipes, merge and evaluate their chunks, compare strategies, launch on Slurm.

    ttc run recipes/SmolLM2-135M-Instruct/best_of_n.yaml --set n=8

Commands are thin; heavy imports (torch, transformers, mlflow) happen inside their bodies so that
`ttc --help` is instant.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

SET_HELP = "Override a recipe field: --set key=value (repeatable; values read as YAML)."


def _fail(message: str, code: int = 2, name_run: bool = True) -> None:
    """One line on stderr, then exit `code` (2: bad input or setup, nothing was run; 1: a run failed).
    `name_run=False` where the store itself cannot take a write (each try would retry for minutes)."""
    if name_run and os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: its run says why, not just FAILED
        from .pipeline.store import mark_launched_failed

        try:
            mark_launched_failed(message)
        except Exception as err:  # the store itself may be what failed: the error below still shows
            logging.getLogger(__name__).warning("could not name the mlflow run after the error: %s", err)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _recipe(path: str, overrides: list[str]):
    from .config import RecipeError, load_recipe

    try:
        return load_recipe(path, overrides)
    except RecipeError as err:
        _fail(str(err))


def _plain_errors(command):
    """A failure of the tracking store or of the disk ends in one line that says what failed and what to
    do, not a traceback: exit 2 where the store was found unusable before any work, else 1. Ctrl-C
    outside a chunk's search (which marks its run FAILED itself) ends in one line too."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import click

        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted (Ctrl-C): nothing past this point was done; run the same command again to "
                        "go on", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(128 + signal.SIGINT) from None
        except Exception as err:
            from .pipeline.store import StoreError, describe_failure

            found = describe_failure(err)
            if found is None:
                raise
            message, writable = found
            _fail(message, code=2 if isinstance(err, StoreError) else 1, name_run=writable)

    return wrapper


def _store_ready() -> None:
    """The tracking store answers and takes this process's credentials, within seconds (StoreError)."""
    from .pipeline.store import check_tracking

    check_tracking()


def setup_logging(verbose: bool = False) -> None:
    """Progress on stderr for `ttc` and the benchmark scripts; chatty libraries only warn."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a CLI summary, not four "Downloading artifacts" bars nor MLflow's INFO lines (it reads these on import)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    setup_logging(verbose)


@app.command()
@_plain_errors
def validate(recipe: str = typer.Argument(..., help="Recipe YAML."),
             set_: list[str] = typer.Option([], "--set", help=SET_HELP),
             show: bool = typer.Option(False, help="Print the resolved recipe (its fields only; nothing else is read)."),
             preflight_: bool = typer.Option(True, "--preflight/--fields-only",
                                             help="Also run `ttc run`'s preflight: dataset, models, prompt lengths, stores.")) -> None:
    """Check a recipe as `ttc run` would before any model loads: fields, types, cross-field rules,
    its PRM family, then (unless --fields-only) the dataset, the models' paths and tokenizers, the
    prompts against the context, output_dir and the tracking store. Loads no weights."""
    from .config import RecipeError, recipe_yaml
    from .prm.families import families, family_for

    r = _recipe(recipe, set_)
    try:
        family = family_for(r.prm_path, r.prm_family)
        if show:
            typer.echo(recipe_yaml(r))
            return
        problems = None
        if preflight_:
            from .data import row_range
            from .pipeline.run_chunk import preflight

            problems = preflight(r)
            start, end = row_range(len(problems), r)
            _store_ready()
    except RecipeError as err:
        _fail(str(err))
    checked = (f"; preflight passed: {end - start} of {len(problems)} problems, tracking store ready"
               if problems is not None else " (fields only)")
    typer.echo(f"ok: {recipe} ({r.approach}, n={r.n}, model={r.model_path}, prm={r.prm_path} [{family}]){checked}")
    found = sorted(families().values(), key=lambda f: (f.dist is not None, f.name))
    typer.echo("PRM families: " + ", ".join(f.name if f.dist is None else f"{f.name} (plugin: {f.dist})" for f in found))


@app.command()
@_plain_errors
def run(recipe: str = typer.Argument(..., help="Recipe YAML."),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        chunk: Optional[int] = typer.Option(None, help="This process's chunk (0-based)."),
        num_chunks: Optional[int] = typer.Option(None, help="Chunks the problem set is split into."),
        parent_run_id: Optional[str] = typer.Option(None, help="Log under this parent run."),
        overrides: str = typer.Option("", help="Overrides in one string, 'n=8 seed=1' (MLproject's `set`)."),
        progress: bool = typer.Option(True, help="Show a progress bar.")) -> None:
    """Run a search recipe (one chunk of it) as an MLflow child run under its configuration's parent."""
    import shlex

    from .config import RecipeError

    extra = [f"{k}={v}" for k, v in (("chunk", chunk), ("num_chunks", num_chunks), ("parent_run_id", parent_run_id)) if v is not None]
    try:
        split = shlex.split(overrides)
    except ValueError as err:  # an unbalanced quote
        _fail(f"--overrides={overrides!r}: {err}: expected key=value items separated by spaces, a value with "
              f"spaces quoted whole (system_prompt='Solve it.')")
    r = _recipe(recipe, [*split, *set_, *extra])
    from .pipeline.lease import ChunkBusy, lease_s
    from .pipeline.merge import strip_chunk_fields
    from .pipeline.run_chunk import Stopped, run_chunk
    from .serving import ServerError

    try:
        lease_s()  # TTC_LEASE_S, checked before any run exists
        _store_ready()
        result = run_chunk(r, progress=progress)
    except RecipeError as err:
        _fail(str(err))
    except ChunkBusy as err:
        _fail(str(err), code=1)
    except Stopped as err:
        typer.secho(f"{err}: the chunk run is marked FAILED, what was checkpointed is kept; run the same command to "
                    f"resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(128 + getattr(signal, err.signal))
    except ServerError as err:  # backend openai or prm_base_url: a server stopped answering mid-search
        _fail(f"{err}: the chunk run is marked FAILED, what was checkpointed is kept; once the server answers, run "
              f"the same command to resume", code=1)
    _summary(r, result)
    if all(getattr(r, k) is None for k in ("chunk", "num_chunks", "dataset_start", "dataset_end")):
        # the whole problem set in one process: finish the pipeline on its parent
        _merge_and_report(result.parent_run_id, strip_chunk_fields(r), allow_partial=False, push=False)
        _evaluate_and_report(result.parent_run_id, strip_chunk_fields(r))


def _summary(recipe, result) -> None:
    from . import names
    from .pipeline.store import tracking_uri

    m = result.metrics
    if result.skipped:
        typer.echo(f"chunk already finished in run {result.run_id}: nothing to do")
    acc = m.get(names.M_ACC_SELECTED)
    rows = [
        ("strategy", f"{recipe.approach} (n={recipe.n}, model={recipe.model_path})"),
        ("problems", f"{len(result.records)}" + (f" ({result.resumed_from} from checkpoint)" if result.resumed_from and not result.skipped else "")),
        ("accuracy (selected)", "n/a" if acc is None else f"{acc:.3f}"),
        ("completion tokens", f"{m.get(names.M_COMPLETION_TOKENS, 0):.0f}"),
        ("tokens/s", f"{m.get(names.M_TOKENS_PER_S, 0):.1f}"),
        ("wall time", f"{m.get(names.M_WALL_S, 0):.1f} s"),
        ("chunk run", result.run_id),
        ("parent run", result.parent_run_id),
        ("tracking", tracking_uri()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")
    typer.echo(f"open: mlflow ui --backend-store-uri {tracking_uri()}")


def _parent(recipe: Optional[str], set_: list[str], parent_run_id: Optional[str]):
    """(parent run id, recipe) from exactly one of RECIPE or --parent-run-id."""
    from .config import RecipeError
    from .pipeline.merge import MergeError, resolve_parent

    if (recipe is None) == (parent_run_id is None):
        _fail("give exactly one of RECIPE or --parent-run-id to say which parent run")
    r = _recipe(recipe, set_) if recipe is not None else None
    _store_ready()
    try:
        return resolve_parent(r, parent_run_id, set_ if recipe is None else [])
    except (RecipeError, MergeError) as err:
        _fail(str(err), code=1)


def _merge_and_report(parent_id: str, recipe, allow_partial: bool, push: bool) -> None:
    from .config import RecipeError
    from .pipeline import merge

    try:
        result = merge.merge(parent_id, recipe, allow_partial)
    except (RecipeError, merge.MergeError) as err:
        _fail(str(err), code=1)
    merge.log_merge(result)
    state = "partial" if result.partial else "complete"
    typer.echo(f"merged {len(result.records)} of {result.total} problems from {len(result.chunks)} chunk run(s) "
               f"into parent {parent_id} ({state})")
    for line in result.problems_report:
        typer.echo(f"  {line}")
    if push or recipe.push_to_hub:
        try:
            config = merge.push_to_hub(result)
        except merge.MergeError as err:
            _fail(str(err), code=1)
        typer.echo(f"pushed to https://huggingface.co/datasets/{recipe.hub_dataset_id} (config {config})")


def _evaluate_and_report(parent_id: str, recipe) -> None:
    from . import names
    from .pipeline.evaluate import evaluate_parent
    from .plots import format_table
    from .voting import EvaluateError

    try:
        result = evaluate_parent(parent_id, recipe)
    except (EvaluateError, LookupError) as err:
        _fail(str(err), code=1)
    ev = result.evaluation
    overall = [r for r in ev.rows if r["level"] == "all"]
    rules = [m for m in names.VOTING_METRICS if m in overall[0]]
    typer.echo(format_table(["n", *rules], [[str(r["n"]), *[f"{r[m]:.3f}" for m in rules]] for r in overall]))
    if ev.undecided:
        typer.echo(f"{ev.undecided} answer class(es) the grader could not decide, counted wrong ({names.M_UNDECIDED})")
    typer.echo(f"{ev.problems} problems, {ev.distinct_answers} distinct answers; metrics on parent run {parent_id}"
               + (" (unchanged: evaluated before)" if result.already else ""))
    if result.registered:
        name, version = result.registered
        best = (f"best: models:/{name}@{names.BEST_ALIAS} = version {result.best}" if result.best
                else f"no `{names.BEST_ALIAS}` alias: no version scored above 0")
        typer.echo(f"registered: models:/{name}/{version} ({best})")


@app.command("merge")
@_plain_errors
def merge_command(recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (or give --parent-run-id)."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          parent_run_id: Optional[str] = typer.Option(None, help="The parent run to merge."),
          allow_partial: bool = typer.Option(False, "--allow-partial", envvar="TTC_ALLOW_PARTIAL",
                                             help="Merge despite missing / duplicate problems; tag the result partial."),
          push_to_hub: bool = typer.Option(False, "--push-to-hub", help="Also upload the merged records to hub_dataset_id.")) -> None:
    """Merge the chunk runs of a parent, checking that every problem comes exactly once."""
    from .pipeline.store import adopt_launched_run

    pid, r = _parent(recipe, set_, parent_run_id)
    adopt_launched_run(pid, "merge")
    _merge_and_report(pid, r, allow_partial, push_to_hub)


@app.command("evaluate")
@_plain_errors
def evaluate_command(recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (or give --parent-run-id)."),
             set_: list[str] = typer.Option([], "--set", help=SET_HELP),
             parent_run_id: Optional[str] = typer.Option(None, help="The merged parent run to evaluate.")) -> None:
    """Grade a parent's merged records at n = 1, 2, 4, ..., N; log metrics (step = n) and register."""
    from .pipeline.store import adopt_launched_run

    pid, r = _parent(recipe, set_, parent_run_id)
    adopt_launched_run(pid, "evaluate")
    _evaluate_and_report(pid, r)


def _experiment(name: Optional[str]) -> str:
    """The experiment given, else the only one that has parent runs."""
    _store_ready()
    if name is not None:
        return name
    from .pipeline.store import experiments_with_parents

    found = experiments_with_parents()
    if len(found) != 1:
        _fail(f"--experiment is needed: {len(found)} experiments have parent runs ({found})")
    return found[0]


@app.command("compare")
@_plain_errors
def compare_command(experiment: Optional[str] = typer.Option(None, help="Experiment (default: the only one with parent runs)."),
            model: Optional[str] = typer.Option(None, help="Only this policy model (path or label)."),
            output: str = typer.Option("accuracy_vs_n.png", help="Where to write the PNG."),
            allow_mixed: bool = typer.Option(False, "--allow-mixed", help="Draw runs of different problem sets together.")) -> None:
    """Draw accuracy against N for every strategy and voting rule of an experiment; log it to MLflow."""
    from .pipeline.compare import compare

    experiment = _experiment(experiment)
    try:
        _, text, run_id = compare(experiment, model, output, allow_mixed)
    except LookupError as err:
        _fail(str(err), code=1)
    typer.echo(text)
    typer.echo(f"wrote {output}; logged to run {run_id} of experiment {experiment!r}")


@app.command("launch")
@_plain_errors
def launch_command(recipe: str = typer.Argument(..., help="Recipe YAML."),
           set_: list[str] = typer.Option([], "--set", help=SET_HELP),
           chunks: int = typer.Option(..., help="Chunks = Slurm array tasks the problems are split into."),
           only_missing: bool = typer.Option(False, "--only-missing", help="Submit only chunks without a finished run, then merge + evaluate."),
           sbatch_arg: list[str] = typer.Option([], "--sbatch-arg", help="Extra sbatch option for the chunk tasks, e.g. --sbatch-arg=--qos=high (repeatable)."),
           merge_sbatch_arg: list[str] = typer.Option([], "--merge-sbatch-arg", help="Extra sbatch option for the merge + evaluate job (repeatable)."),
           max_parallel: Optional[int] = typer.Option(None, help="Array tasks running at once (--array=...%N)."),
           parent_run_id: Optional[str] = typer.Option(None, help="Launch under this parent run."),
           log_dir: str = typer.Option("slurm-logs", help="Slurm logs and the recipe copy go to LOG_DIR/<parent run id>/ (a shared filesystem)."),
           cluster_file: Optional[str] = typer.Option(None, help="Cluster specifics (default: $TTC_CLUSTER or slurm/cluster.sh)."),
           serve_prm: bool = typer.Option(False, "--serve-prm", help="Serve the PRM once for the sweep (a `vllm serve --runner pooling` job every task scores through; stopped after merge)."),
           serve_arg: list[str] = typer.Option([], "--serve-arg", help="Extra option for that `vllm serve`, e.g. --serve-arg=--enforce-eager (repeatable)."),
           server_wait: int = typer.Option(3600, min=1, help="Seconds a task waits for the PRM server to be healthy (--serve-prm).")) -> None:
    """Submit a recipe to Slurm: one array task per chunk, then a dependent merge + evaluate job
    (with --serve-prm, first a PRM server job that every task scores through)."""
    import shlex

    from . import names
    from .config import RecipeError
    from .pipeline.launch import LaunchError, launch

    try:
        _store_ready()
        done = launch(recipe, set_, chunks, only_missing=only_missing, sbatch_args=sbatch_arg,
                      merge_sbatch_args=merge_sbatch_arg, max_parallel=max_parallel, log_dir=log_dir,
                      parent_run_id=parent_run_id, cluster_file=cluster_file, serve_prm=serve_prm,
                      serve_args=serve_arg, server_wait_s=server_wait)
    except (RecipeError, LaunchError) as err:
        _fail(str(err))
    jobs = ",".join(j for j in (done.server_job, done.array_job, done.merge_job) if j)
    served = [("PRM server", f"job {done.server_job}: address in {done.log_dir}/prm-server.url once healthy; "
                             f"stopped after merge (job {done.stop_job} if merge never runs)")] if done.server_job else []
    rows = [*served,
        ("parent run", f"{done.parent_run_id} (experiment {done.experiment_id})"),
        ("chunks", f"job {done.array_job}: {len(done.chunks)} of {done.num_chunks} chunks of {done.problems} problems"
                   if done.array_job else f"none submitted: all {done.num_chunks} chunks finished"),
        *([("finished before", f"chunks {done.finished_before}: " + ("not submitted" if only_missing else
                                                                     "their tasks skip them"))]
          if done.finished_before and done.array_job else []),
        ("merge + evaluate", f"job {done.merge_job}" + (f" (after {done.array_job} succeeds)" if done.array_job else "")),
        ("logs", str(done.log_dir)),
        ("tracking", done.tracking_uri),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")
    typer.echo(f"follow: squeue -j {jobs}; tail -f {done.log_dir}/*.out; "
               f"{names.run_url(done.tracking_uri, done.experiment_id, done.parent_run_id)}")
    typer.echo(f"if a task fails: ttc launch {recipe} --chunks {done.num_chunks} --only-missing"
               + "".join(f" --set {shlex.quote(s)}" for s in set_))


@app.command("wait-server", hidden=True)
def wait_server_command(url_file: str = typer.Argument(..., help="Where the PRM server job writes its address."),
                        job: str = typer.Option("", help="The server's Slurm job: waiting stops if it ends."),
                        timeout: float = typer.Option(3600, help="Seconds to wait at most.")) -> None:
    """For slurm/chunks.sbatch under `ttc launch --serve-prm`: print the PRM server's URL once it is healthy."""
    from .pipeline.launch import LaunchError, wait_for_server

    try:
        typer.echo(wait_for_server(url_file, job or None, timeout))
    except LaunchError as err:
        _fail(str(err))


@app.command("optimal")
@_plain_errors
def optimal_command(experiment: Optional[str] = typer.Option(None, help="Experiment (default: the only one with parent runs)."),
            model: Optional[str] = typer.Option(None, help="Only this policy model (path or label)."),
            difficulty: str = typer.Option("model", help="Bins of: oracle (pass@1 against the gold answers) or "
                                                         "model (mean PRM score, no gold; the one a deployment can apply)."),
            budget: str = typer.Option("n", help="Budget axis: n (completions per problem) or flops (FLOPs per problem)."),
            rule: str = typer.Option("acc_weighted", help="Voting rule accuracy is measured with."),
            bins: int = typer.Option(5, min=1, help="Difficulty bins (quantiles of the problems)."),
            cross_validate: bool = typer.Option(True, "--cross-validate/--no-cross-validate",
                                                help="Choose on one half of the problems, score on the other (off: "
                                                     "chosen and scored on the same problems, biased upwards)."),
            output: str = typer.Option("compute_optimal.png", help="Where to write the PNG.")) -> None:
    """Compute-optimal scaling: per difficulty bin and budget the best strategy, against every fixed one; log the table to deploy."""
    from .pipeline.routing_table import build_routing_table, deploy_command

    experiment = _experiment(experiment)
    try:
        done = build_routing_table(experiment, model, difficulty, budget, rule, bins, cross_validate, output)
    except LookupError as err:  # RoutingError, or the store's: the experiment, a run, an artifact
        _fail(str(err), code=1)
    typer.echo(f"accuracy ({rule}) against budget ({budget}):")
    typer.echo(done.curve_text)
    typer.echo(f"\nchosen per {difficulty} difficulty bin (1 easiest; * the bin had no problems: chosen on all):")
    typer.echo(done.routes_text)
    typer.echo(f"\nwrote {output}; logged to run {done.run_id} of experiment {experiment!r} (difficulty from "
               f"best-of-N parent {done.difficulty_run}); table kept at {done.table_file}")
    if difficulty == "model":
        typer.echo(f"deploy: {deploy_command(done.run_id, budget)}")


@app.command("fetch-table")
@_plain_errors
def fetch_table_command(run_id: str = typer.Argument(..., metavar="RUN_ID", help="A `ttc optimal` run.")) -> None:
    """Fetch the routing table of a `ttc optimal` run to where `optimal_table: RUN_ID` reads it."""
    from .pipeline.routing_table import fetch_table

    _store_ready()
    try:
        typer.echo(f"table of {run_id}: {fetch_table(run_id)}")
    except LookupError as err:
        _fail(str(err), code=1)


if __name__ == "__main__":
    app()
