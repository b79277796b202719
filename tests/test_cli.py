import subprocess
import sys

from conftest import REPO
from typer.testing import CliRunner

from ttc_mlops.cli import app

runner = CliRunner()


def test_help_and_search_imports_stay_light():
    code = ("import sys, ttc_mlops.cli, ttc_mlops.search, ttc_mlops.config, ttc_mlops.data; "
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'mlflow') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert runner.invoke(app, ["--help"]).exit_code == 0


def test_validate_ok_and_show():
    path = REPO / "recipes/SmolLM2-135M-Instruct/best_of_n.yaml"
    result = runner.invoke(app, ["validate", str(path), "--set", "n=8", "--show"])
    assert result.exit_code == 0 and "n: 8" in result.output


def test_bad_recipe_exits_nonzero_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("approach: best_of_n\nn: 0\ntemprature: 0.7\n")
    for command in ("validate", "run"):
        result = runner.invoke(app, [command, str(bad)])
        assert result.exit_code == 2
        assert "unknown key 'temprature'" in result.output and "n=0" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # no run was created


def test_missing_dataset_file_exits_before_model_or_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path = REPO / "recipes/SmolLM2-135M-Instruct/best_of_n.yaml"
    result = runner.invoke(app, ["run", str(path), "--set", "dataset_name=./missing.jsonl"])
    assert result.exit_code == 2 and "dataset_name='./missing.jsonl': no such file" in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_a_failed_preflight_under_mlflow_run_names_its_run(mlflow_store, monkeypatch):
    """`mlflow run -P set=...` with a typo: its run says what failed instead of a bare FAILED."""
    from ttc_mlops import names
    from ttc_mlops.pipeline import store

    launched = store.client().create_run("0")  # what `mlflow run` creates before our command
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    path = REPO / "recipes/SmolLM2-135M-Instruct/best_of_n.yaml"
    result = runner.invoke(app, ["run", str(path), "--overrides", "n=abc"])
    assert result.exit_code == 2 and "n='abc'" in result.output
    tags = store.client().get_run(launched.info.run_id).data.tags
    assert tags[names.TAG_ROLE] == names.ROLE_FAILED and "n='abc'" in tags[names.TAG_ERROR]
    assert tags[names.TAG_RUN_NAME].startswith("failed preflight: n='abc'")


def test_validate_runs_the_preflight_of_run(tmp_path, monkeypatch):
    """A dataset `ttc run` refuses is refused by `ttc validate` too, before any run exists."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    data = tmp_path / "no_answers.jsonl"
    data.write_text('{"problem": "What is 1+1?"}\n')
    path = REPO / "recipes/SmolLM2-135M-Instruct/best_of_n.yaml"
    result = runner.invoke(app, ["validate", str(path), "--set", f"dataset_name={data}"])
    assert result.exit_code == 2 and "have no gold answer" in result.output
    fields = runner.invoke(app, ["validate", str(path), "--set", f"dataset_name={data}", "--fields-only"])
    assert fields.exit_code == 0 and "(fields only)" in fields.output
    assert not (tmp_path / "mlflow.db").exists()
