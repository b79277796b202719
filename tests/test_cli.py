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
