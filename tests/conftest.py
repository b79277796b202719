import contextlib
import sys
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

    shutil.copy(_migrated_db, tmp_path / "mlflow.db")
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


@pytest.fixture
def math500():
    path = SHARED_DATA / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2 converted to safetensors (once per machine, cached)."""
    from ttc_mlops.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(embedded_dir, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: real plumbing, no weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
