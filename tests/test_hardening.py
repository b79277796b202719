"""Hostile and broken input, a broken environment: each ends in one line that names what failed and
what to do (exit 2: bad input or setup, nothing run; 1: a run failed), never a hang or a traceback.

    python -m pytest -q tests/test_hardening.py -m "not slow"

Through the real CLI (typer's runner, or `ttc` in a subprocess where signals or fresh processes
matter), a real SQLite store, a real basic-auth `mlflow server`, and a real tmpfs for the full and
the read-only disk (mounted where this runs as root; skipped elsewhere).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_healthy
from fakes import FakePolicy, FakePRM
from typer.testing import CliRunner

from ttc_mlops import names
from ttc_mlops.cli import app
from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe, RecipeError, load_recipe
from ttc_mlops.data import builtin_problems
from ttc_mlops.pipeline import store
from ttc_mlops.pipeline.run_chunk import run_chunk

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "SmolLM2-135M-Instruct" / "best_of_n.yaml"
PROBLEMS = builtin_problems()[:4]


def cli(*args, env=None):
    return CliRunner().invoke(app, list(args), env=env)


def one_line_error(out) -> str:
    """The error the CLI printed: exactly one `error:` line and no traceback."""
    text = out.output
    assert "Traceback" not in text and (out.exception is None or isinstance(out.exception, SystemExit)), text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-2000:]
    return errors[0]


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nn: *a{levels}\n"


# --- class 1: bounded input


@pytest.mark.slow
def test_a_billion_laughs_recipe_is_refused_at_once(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    start = time.time()
    out = cli("validate", str(path))
    assert out.exit_code == 2 and time.time() - start < 10
    assert "YAML alias *a0 is not accepted in a recipe" in one_line_error(out) and "line 2" in out.output
    # the same file in a subprocess, its memory measured: no expansion anywhere
    done = subprocess.run([sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
                           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
                           sys.executable, "-m", "ttc_mlops.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert int(done.stdout.split()[-1]) < 400_000  # KiB: an interpreter and the CLI, not gigabytes


def test_an_alias_in_an_override_is_only_text(tmp_path):
    out = cli("validate", str(RECIPE), "--set", "stop=[&a [x, x], *a]")
    assert out.exit_code == 2 and "unknown key 'stop'" in one_line_error(out)
    out = cli("validate", str(RECIPE), "--set", "n=*a")  # no anchor: YAML refuses it, so it stays the text
    assert out.exit_code == 2 and "n='*a'" in one_line_error(out)


def test_errors_are_bounded_in_size(tmp_path):
    path = tmp_path / "wide.yaml"
    path.write_text("n: [" + ", ".join(["123456789"] * 5000) + "]\n")  # 55 KB: under the size limit
    out = cli("validate", str(path))
    assert out.exit_code == 2 and len(one_line_error(out)) < 400
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"field_{i}: 1\n" for i in range(60)))
    out = cli("validate", str(many))
    assert out.exit_code == 2 and "... and 40 more problem(s)" in out.output and len(out.output) < 6000
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * 20_000)
    with pytest.raises(RecipeError, match=r"is 200000 bytes: expected a YAML mapping of Recipe fields \(at most 131072"):
        load_recipe(huge)


def test_a_yaml_error_is_one_line(tmp_path):
    path = tmp_path / "quote.yaml"
    path.write_text('n: 4\nsystem_prompt: "abc\n')
    out = cli("validate", str(path))
    assert out.exit_code == 2 and "is not valid YAML: line 3, column 1: found unexpected end of stream" in one_line_error(out)


def test_a_problem_longer_than_the_context_is_refused_with_its_id(tiny_llama_dir):
    from ttc_mlops.data import Problem
    from ttc_mlops.models import check_prompt_lengths

    r = Recipe(model_path=str(tiny_llama_dir), prm_path=str(tiny_llama_dir), max_tokens=16)
    fits = [Problem("ok/1", "What is 2 + 3?", "5")]
    assert check_prompt_lengths(r.policy_settings, r.system_prompt, fits, r.max_tokens) == 2048
    long = fits + [Problem("long/7", "What is " + "1 + " * 3000 + "1?", "3001"), Problem("huge/1", "x" * 200_000, "0")]
    with pytest.raises(RecipeError) as err:
        check_prompt_lengths(r.policy_settings, r.system_prompt, long, r.max_tokens)
    text = str(err.value)
    assert text.startswith("2 problem(s) are longer than the 2048-token context") and "'long/7' (" in text
    assert "'huge/1' (over 131072 characters)" in text and "ok/1" not in text


def test_jsonl_with_unicode_line_separators_inside_strings_loads(tmp_path):
    from ttc_mlops.data import load_dataset_problems

    path = tmp_path / "odd.jsonl"
    rows = [{"problem": "a\u2028b\x85c\u2029d\x1ce", "answer": "1"}, {"problem": "plain", "answer": "2"}]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    problems = load_dataset_problems(Recipe(dataset_name=str(path)))
    assert [p.problem for p in problems] == [r["problem"] for r in rows]


# --- class 5: one line for each broken setting or environment


def test_an_unbalanced_quote_in_overrides_is_named(mlflow_store):
    out = cli("run", str(RECIPE), "--overrides", "n=2 system_prompt='Solve it.")
    line = one_line_error(out)
    assert out.exit_code == 2 and "--overrides=\"n=2 system_prompt='Solve it.\": No closing quotation" in line
    assert store.client().search_experiments(filter_string="name != 'Default'") == []


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "1"])
def test_a_bad_lease_setting_is_refused_before_any_run(mlflow_store, value):
    out = cli("run", str(RECIPE), "--set", "num_samples=1", env={"TTC_LEASE_S": value})
    assert out.exit_code == 2 and f"TTC_LEASE_S={value!r}: expected the chunk lease in seconds, a number >= 2" \
        in one_line_error(out)
    assert store.client().search_experiments(filter_string="name != 'Default'") == []


@pytest.mark.slow
def test_the_heartbeat_reads_its_lease_once(mlflow_store, monkeypatch):
    from ttc_mlops.pipeline.lease import Heartbeat

    monkeypatch.setenv("TTC_LEASE_S", "8")
    exp = store.ensure_experiment("beat")
    run_id = store.client().create_run(exp).info.run_id
    beat = Heartbeat(run_id)
    monkeypatch.setenv("TTC_LEASE_S", "abc")  # changed under a running beat: it keeps its 2 s
    time.sleep(2.5)
    assert beat._thread.is_alive() and beat.every_s == 2
    monkeypatch.setenv("TTC_LEASE_S", "8")
    beat.release()
    assert store.get_run(run_id).data.tags[names.TAG_LEASE_RENEWED] == "0"


@pytest.mark.parametrize("command", [["run", str(RECIPE)], ["merge", "--parent-run-id", "0" * 32],
                                     ["evaluate", "--parent-run-id", "0" * 32], ["compare", "--experiment", "x"]])
@pytest.mark.slow
def test_an_unreachable_server_is_reported_within_seconds(tmp_path, monkeypatch, command):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    start = time.time()
    done = subprocess.run(["ttc", *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.time() - start < 20, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: tracking server {uri} did not answer (3 tries of 3 s; Connection refused): start it, or point "
        f"MLFLOW_TRACKING_URI at one that runs")


# The basic-auth server as the README starts it (the same lines; only the paths, port and secrets
# differ): MLflow 3.17 needs MLFLOW_FLASK_SERVER_SECRET_KEY, and the admin password must have 12+ characters.
SERVER_COMMAND = r"""
mkdir -p "$STORE"
export MLFLOW_AUTH_CONFIG_PATH="$STORE/auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$SECRET"
export MLFLOW_FLASK_SERVER_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
printf '[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///%s/auth.db\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' "$STORE" > "$MLFLOW_AUTH_CONFIG_PATH"
exec mlflow server --app-name basic-auth --backend-store-uri "sqlite:///$STORE/mlflow.db" \
    --artifacts-destination "$STORE/artifacts" \
    --host 127.0.0.1 --port "$PORT" --allowed-hosts "127.0.0.1:$PORT"
"""


@contextmanager
def readme_auth_server(tmp_path, secret):
    port = free_port()
    env = {**os.environ, "STORE": str(tmp_path / "server"), "SECRET": secret, "PORT": str(port)}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(["bash", "-c", SERVER_COMMAND], env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, tmp_path / "server.log", 180, "the README's server")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.server
def test_the_readme_auth_server_and_a_missing_or_wrong_password(tmp_path, monkeypatch):
    secret = "correct-horse-battery-staple-42"
    with readme_auth_server(tmp_path, secret) as uri:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        base["MLFLOW_TRACKING_URI"] = uri
        subprocess.run(["ttc", "compare"], capture_output=True, timeout=120, env=base)  # the server's first answer is slow
        for creds, expected in [({}, "needs credentials and none were given (HTTP 401)"),
                                ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"},
                                 "refused the credentials in MLFLOW_TRACKING_USERNAME (HTTP 401)")]:
            start = time.time()
            done = subprocess.run(["ttc", "run", str(RECIPE), "--set", "num_samples=1"], capture_output=True,
                                  text=True, timeout=120, env={**base, **creds})
            assert done.returncode == 2 and time.time() - start < 30, done.stderr[-2000:]
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith(f"error: tracking server {uri} {expected}") and "MLFLOW_TRACKING_PASSWORD" in last
            assert "Traceback" not in done.stderr
        # with the password the store takes writes: the chunk -> merge -> evaluate flow, as tests/test_auth.py
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
        import mlflow

        mlflow.set_tracking_uri(uri)
        try:
            store.check_tracking()
            pid = run_chunk(fake_recipe("readme-auth"), FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
            done = subprocess.run(["ttc", "merge", "--parent-run-id", pid], capture_output=True, text=True,
                                  timeout=300, env=os.environ.copy())
            assert done.returncode == 0, done.stderr[-2000:]
        finally:
            mlflow.set_tracking_uri(None)


@contextmanager
def tmpfs(path: Path, size: str = "4m"):
    """A real tmpfs at `path` (root only), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass


@pytest.mark.slow
def test_a_store_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "full") as full:
        fill(full)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{full}/mlflow.db")
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        monkeypatch.chdir(tmp_path)
        done = subprocess.run(["ttc", "run", str(RECIPE), "--set", "num_samples=1"], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: tracking store sqlite:///{full}/mlflow.db: its disk is full (sqlite: database or disk is "
            f"full): free space there, or point MLFLOW_TRACKING_URI at another disk, then run the same command again")


@pytest.mark.slow
def test_artifacts_on_a_full_disk_fail_the_chunk_in_one_line(mlflow_store, tmp_path, tiny_llama_dir, monkeypatch):
    """The store's database has room, its artifact root (./mlruns, made where the experiment is
    created) has none: the first checkpoint cannot be written."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir).model_dump()))
    with tmpfs(tmp_path / "full") as full:
        monkeypatch.chdir(full)
        fill(full)
        done = subprocess.run(["ttc", "run", str(recipe), "--no-progress"], capture_output=True, text=True,
                              timeout=300, env=os.environ.copy())
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: no space left on the device") and "run the same command again" in last
        from ttc_mlops.pipeline import store

        chunks = store.client().search_runs([e.experiment_id for e in store.client().search_experiments()],
                                            filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")
        assert chunks and all(r.info.status == "FAILED" for r in chunks)  # never left RUNNING
        assert all("no space left" in r.data.tags.get(names.TAG_ERROR, "") for r in chunks)


def test_a_read_only_store_is_refused_before_any_work(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "ro") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        uri = f"sqlite:///{ro}/mlflow.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        monkeypatch.chdir(tmp_path)
        out = cli("run", str(RECIPE), "--set", "num_samples=1")
        assert out.exit_code == 2
        assert one_line_error(out) == (f"error: tracking store {uri}: {ro} cannot be written (as uid 0): make it "
                                       f"writable, or point MLFLOW_TRACKING_URI at a store that is")


@pytest.mark.slow
def test_ctrl_c_fails_the_chunk_run_as_sigterm_does(mlflow_store, tmp_path, tiny_llama_dir):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir, num_samples=20, max_tokens=200,
                                                 search_batch_size=1).model_dump()))
    proc = subprocess.Popen(["ttc", "run", str(recipe), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while not chunk_runs("hard"):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    time.sleep(3)  # into the search
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "stopped by SIGINT: the chunk run is marked FAILED, what was checkpointed is kept; run the same command")
    [run] = chunk_runs("hard")
    assert run.info.status == "FAILED" and run.data.tags[names.TAG_STOPPED_BY] == "SIGINT"


# --- class 2: a registered version runs no code it was not asked to

SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.8]", "So \\boxed{0}[s=0.2]"] for p in PROBLEMS}


def fake_recipe(experiment, **kw):
    return Recipe(**{"model_path": EMBEDDED_MODEL, "prm_path": EMBEDDED_MODEL, "dataset_name": BUILTIN_DATASET,
                     "num_samples": 2, "n": 2, "experiment_name": experiment, **kw})


def tiny_recipe(model, **kw):
    return Recipe(**{"model_path": str(model), "prm_path": str(model), "prm_family": "rlhflow", "device": "cpu",
                     "dtype": "float32", "dataset_name": BUILTIN_DATASET, "num_samples": 2, "n": 2, "max_tokens": 8,
                     "experiment_name": "hard", **kw})


def chunk_runs(experiment):
    exp = store.client().get_experiment_by_name(experiment)
    return [] if exp is None else store.client().search_runs(
        [exp.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_CHUNK}'")


def registered(recipe, script=SCRIPT):
    from ttc_mlops.pipeline.evaluate import evaluate_parent
    from ttc_mlops.pipeline.merge import log_merge, merge

    pid = run_chunk(recipe, FakePolicy(script), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, recipe))
    return evaluate_parent(pid, recipe, workers=1)


def overwrite_recipe(parent_id, text, tmp_path):
    """What a writer of the store can do: replace the version's recipe.yaml artifact."""
    folder = tmp_path / "evil"
    folder.mkdir(exist_ok=True)
    (folder / names.RECIPE_ARTIFACT).write_text(text)
    store.client().log_artifact(parent_id, str(folder / names.RECIPE_ARTIFACT), f"{names.MODEL_ARTIFACT}/artifacts")


@pytest.mark.slow
def test_load_search_refuses_a_recipe_changed_after_registration(mlflow_store, tmp_path):
    from ttc_mlops.pipeline.model import VersionRefused, load_search

    done = registered(fake_recipe("sec"))
    name, version = done.registered
    uri = f"models:/{name}/{version}"
    assert load_search(uri).recipe.trust_remote_code is False
    text = store.load_run_text(done.parent_run_id, f"{names.MODEL_ARTIFACT}/artifacts/{names.RECIPE_ARTIFACT}")
    evil = text.replace("trust_remote_code: false", "trust_remote_code: true")
    assert evil != text
    overwrite_recipe(done.parent_run_id, evil, tmp_path)
    with pytest.raises(VersionRefused, match=r"its recipe.yaml is not the recipe registered \(the `recipe` tag "
                                             r"differs from line \d+\)"):
        load_search(uri)
    # a writer who changes the tag too: the recipe asks for code, refused unless the caller opts in
    store.client().set_model_version_tag(name, version, "recipe", evil)
    with pytest.raises(VersionRefused, match="would run code: trust_remote_code: true"):
        load_search(uri)
    assert load_search(uri, allow_code=True).recipe.trust_remote_code is True


@pytest.mark.slow
def test_load_search_refuses_a_model_folder_that_ships_python(mlflow_store, tmp_path):
    from ttc_mlops.pipeline.model import VersionRefused, load_search

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (folder / "evil.py").write_text("import os; os.system('touch pwned')\n")
    name, version = registered(fake_recipe("sec2", model_path=str(folder))).registered
    with pytest.raises(VersionRefused, match=r"model_path='.*model' ships Python \(evil.py\)"):
        load_search(f"models:/{name}/{version}")
    assert not (tmp_path / "pwned").exists()


# --- class 4: integrity of registration and merge


@pytest.mark.slow
def test_a_concurrent_second_registration_of_one_parent_finds_the_first(mlflow_store, monkeypatch):
    """The interleaving that lost: both evaluations found no version, then both created one."""
    from ttc_mlops.pipeline import model

    recipe = fake_recipe("race")
    done = registered(recipe)
    name, first = done.registered
    c = store.client()
    c.delete_model_version(name, first)  # back to before either registered
    create = type(c).create_model_version
    other = {}

    def racing(self, *args, **kwargs):  # the other process creates its version between our check and ours
        if not other:
            other["v"] = create(self, *args, **kwargs).version
        return create(self, *args, **kwargs)

    monkeypatch.setattr(type(c), "create_model_version", racing)
    got_name, got, created, _ = model.register_version(done.parent_run_id, recipe, done.evaluation.at(), names.M_ACC_WEIGHTED)
    assert (got_name, got, created) == (name, str(other["v"]), False)
    assert [str(v.version) for v in c.search_model_versions(f"name = '{name}'")] == [str(other["v"])]


@pytest.mark.slow
def test_two_evaluations_of_one_parent_at_once_register_one_version(mlflow_store):
    from ttc_mlops.pipeline.merge import log_merge, merge

    recipe = fake_recipe("race2")
    pid = run_chunk(recipe, FakePolicy(SCRIPT), FakePRM(), progress=False).parent_run_id
    log_merge(merge(pid, recipe))
    procs = [subprocess.Popen(["ttc", "evaluate", "--parent-run-id", pid], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in outs]
    name = names.registered_model_name(recipe)
    versions = store.client().search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 and all(f"registered: models:/{name}/{versions[0].version} " in o for o, _ in outs)


@pytest.mark.slow
def test_best_is_chosen_within_one_problem_set(mlflow_store):
    half = {p.problem: [f"So \\boxed{{{p.answer if i % 2 == 0 else 0}}}[s=0.7]"] for i, p in enumerate(PROBLEMS)}
    two = registered(fake_recipe("best", num_samples=2, n=1), half)  # 1 of 2 right
    name, v_two = two.registered
    assert two.best == v_two
    one = registered(fake_recipe("best", num_samples=1, n=1), half)  # 1 of 1 right: 1.0 on a smaller set
    assert one.registered[0] == name and one.evaluation.at()[names.M_ACC_WEIGHTED] == 1.0
    assert one.best == v_two and str(store.client().get_model_version_by_alias(name, names.BEST_ALIAS).version) == v_two
    version = store.client().get_model_version(name, one.registered[1])
    assert version.tags[names.TAG_MERGED_PROBLEMS] == "1" and version.tags[names.TAG_PROBLEM_SET]


@pytest.mark.parametrize("field", ["groups", "finished", "step_scores", "agg_scores", "completion_tokens",
                                   "finish_reasons"])
def test_merge_checks_every_per_completion_list(mlflow_store, tmp_path, field):
    from ttc_mlops.pipeline.merge import MergeError, merge

    recipe = fake_recipe("lists")
    result = run_chunk(recipe, FakePolicy(SCRIPT), FakePRM(), progress=False)
    records = store.load_records(result.run_id, names.chunk_artifact(0, 2))
    bad = records[1]
    value = getattr(bad, field)
    setattr(bad, field, value[:-1] if len(value) > 1 else (value * 3 or [0]))
    store.log_records(result.run_id, records, names.chunk_artifact(0, 2))
    # groups / finished: merge's check; the other four the record reader's (named as a corrupt line)
    said = rf"record {bad.problem_id!r}(: 2 completions but .*'{field}': 1| has \d+ {field} for 2 completions)"
    with pytest.raises(MergeError, match=said):
        merge(result.parent_run_id, recipe)
    out = cli("merge", "--parent-run-id", result.parent_run_id)
    assert out.exit_code == 1 and re.search(said, one_line_error(out))
    assert store.load_records(result.parent_run_id, names.MERGED_RECORDS) is None  # nothing overwritten
