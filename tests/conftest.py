import contextlib
import gc
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
    """An empty SQLite store, migrated once per MLflow version on this machine: creating one runs
    MLflow's migrations (3 s here). Kept beside pytest's numbered temp folders, which it outlives, and
    written under another name first, so two sessions at once never read half a file.

    Every store this process opens asks MLflow for its newest schema revision, which it finds by
    loading all its migration scripts again (50 ms; a test session opens a store per test): the
    answer, fixed for an installed MLflow, is read once here for this process."""
    import importlib.metadata
    import os

    from mlflow.store.db import utils as db_utils
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.getbasetemp().parent / f"mlflow-template-{importlib.metadata.version('mlflow')}.db"
    if not path.is_file():
        fresh = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        MlflowClient(f"sqlite:///{fresh}").search_experiments()
        os.replace(fresh, path)
    head = db_utils._get_latest_schema_revision()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db_utils, "_get_latest_schema_revision", lambda: head)
        yield path


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


# Most of this process's heap is the modules it imports (torch, transformers, mlflow, SQLAlchemy: 1.4
# million objects by the end of the fast layer), and Python's full collections scan them all again:
# 22 of them, 8 s of the fast layer here, and 5 more at exit (pytest's unraisable-exception check).
# Once a test has imported a large stack, what is alive is moved out of the collector's sight
# (gc.freeze, after one last collection); later tests' garbage is still collected. Frozen objects no
# longer count towards the "heap grew by a quarter" rule for a full collection, so young collections
# are spaced out too (every 50,000 allocations, not 700): 5 full collections instead of 45, and the
# collector's time over the fast layer falls from 10.4 s to 3.5 s.
FREEZE_AFTER_MODULES = 300
gc.set_threshold(50_000, 20, 20)
_modules_at_freeze = 0


def pytest_runtest_teardown(item, nextitem):
    global _modules_at_freeze
    if len(sys.modules) - _modules_at_freeze >= FREEZE_AFTER_MODULES:
        gc.collect()
        gc.freeze()
        _modules_at_freeze = len(sys.modules)


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


# How many of SmolLM2's tokens the tiny test models keep: its whole vocabulary (49,152) takes 0.4 s to load
# here, every time a test builds a policy or a PRM; its first 2,048 tokens load in 20 ms.
SMALL_VOCAB = 2048


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer cut to its first SMALL_VOCAB tokens (and the merges that make them), with its
    special tokens and chat template, for the tiny random models: a real byte-level BPE that still
    encodes any text (in more tokens), without the weights. Read from the converted copy where this
    machine has one, else out of the GGUF (seconds, where converting the weights takes a minute)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from ttc_mlops.models import SMOLLM2_DIR, _find_gguf, cache_dir

    source = cache_dir() / "models" / SMOLLM2_DIR
    if not (source / "config.json").is_file():
        gguf = _find_gguf()
        source = tmp_path_factory.mktemp("smollm2-tokenizer-whole")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(source)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    whole = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = whole["model"]
    vocab = {token: i for token, i in model["vocab"].items() if i < SMALL_VOCAB}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]  # "a b" in older files
    model["merges"] = [[a, b] for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
    model["vocab"] = vocab
    assert all(t["id"] < SMALL_VOCAB for t in whole["added_tokens"]), "a special token falls outside the cut"
    (out / "tokenizer.json").write_text(json.dumps(whole, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """A 2-layer random Llama with (the start of) SmolLM2's tokenizer and its chat template: real plumbing, no weights."""
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
