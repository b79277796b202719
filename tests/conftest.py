import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory):
    """An empty SQLite store, migrated once: creating one runs MLflow's migrations (seconds each)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _migrated_db):
    """A fresh MLflow SQLite store and artifact root for one test (a copy of the migrated template)."""
    import shutil

    from ttc_mlops.pipeline import store

    shutil.copy(_migrated_db, tmp_path / "mlflow.db")
    # this process is the store's only writer: no concurrent write to wait for (processes racing on
    # a store, tests/test_faults.py's, are other processes and keep the real wait)
    monkeypatch.setattr(store, "SETTLE_S", 0.0)
    with tracking_at(f"sqlite:///{tmp_path}/mlflow.db", monkeypatch, tmp_path) as uri:
        yield uri


@contextlib.contextmanager
def tracking_at(uri, monkeypatch, cwd):
    """Point this process and its children at `uri`, in `cwd`, with no inherited run."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(cwd)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)


# Every test of these kinds runs something real (a model, a server, a cluster), so it is slow too.
SLOW_KINDS = ("e2e", "server", "slurm", "vllm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def math500_rows():
    """MATH-500's rows as the package ships them (`dataset_name: builtin:math500`): no ../shared needed."""
    import gzip
    import json

    from ttc_mlops.data import MATH500_FILE

    return [json.loads(line) for line in gzip.decompress(MATH500_FILE.read_bytes()).decode().splitlines() if line.strip()]


@pytest.fixture
def shared_math500():
    """The published MATH-500 file in ../shared/data, for the one test that compares the package's copy to it."""
    path = SHARED_DATA / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2 converted to safetensors (once per machine, cached): for slow tests only."""
    from ttc_mlops.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer and chat template without its weights: from the converted copy where this
    machine has one, else read out of the GGUF (seconds, where converting the weights takes a minute)."""
    from transformers import AutoTokenizer

    from ttc_mlops.models import SMOLLM2_DIR, _find_gguf, cache_dir

    converted = cache_dir() / "models" / SMOLLM2_DIR
    if (converted / "config.json").is_file():
        return converted
    gguf = _find_gguf()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: real plumbing, no weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch, _migrated_db):
    import shutil

    shutil.copy(_migrated_db, tmp_path / "server.db")  # migrating a fresh store takes the server long
    with serving(tmp_path, monkeypatch) as uri:
        yield uri


def wait_healthy(uri: str, server: subprocess.Popen, log_path, timeout: float, what: str) -> None:
    """Until the server at `uri` answers /health; the test fails with its log if it exits or times out."""
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} did not come up: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def serving(tmp_path, monkeypatch, args: tuple[str, ...] = (), env: dict | None = None, timeout: float = 180):
    """A real `mlflow server` on 127.0.0.1 (a free port) over tmp_path/server.db, this process's
    and its children's tracking store while it runs; stopped after."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, tmp_path / "server.log", timeout, "mlflow server")
        with tracking_at(uri, monkeypatch, tmp_path):
            yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
