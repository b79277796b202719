"""The house: a pure core that never reaches MLflow, the CLI or the pipeline; one wing that talks to MLflow.

    python -m pytest -q tests/test_layout.py

The import graph is read from the source (imports inside functions included), so a lazy import
of the pipeline from the core fails here as surely as a top-level one.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ttc_mlops"
WING = "ttc_mlops.pipeline"
CLI = "ttc_mlops.cli"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every name an import statement of the file names, relative imports made absolute; `from X
    import a` names both X and X.a (a may be a submodule)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found |= {prefix} | {f"{prefix}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports: the package's own (with the packages above them, whose
    __init__ runs first) and the top-level name of every other."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        edges = set()
        for name in _imports(path):
            if name.split(".")[0] != "ttc_mlops":
                edges.add(name.split(".")[0])
                continue
            parts = name.split(".")
            edges |= {".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in files}
        graph[module] = edges - {module}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def is_core(module: str) -> bool:
    return not (module == WING or module.startswith(WING + ".") or module == CLI)


def test_the_graph_reads_the_package():
    graph = import_graph()
    assert {"ttc_mlops.voting", "ttc_mlops.names", "ttc_mlops.pipeline.store", CLI} <= set(graph)
    assert "ttc_mlops.names" in graph["ttc_mlops.voting"] and "mlflow" in graph["ttc_mlops.pipeline.store"]
    assert "ttc_mlops.pipeline.store" in reachable(graph, CLI)  # a lazy import inside a command counts


def test_no_path_from_the_core_into_the_pipeline_the_cli_or_mlflow():
    graph = import_graph()
    core = sorted(m for m in graph if is_core(m))
    assert len(core) > 20
    bad = {}
    for module in core:
        reached = reachable(graph, module)
        wrong = sorted(m for m in reached if not is_core(m) or m == "mlflow")
        if wrong:
            bad[module] = wrong
    assert not bad, f"core modules reaching the pipeline, the CLI or mlflow: {bad}"


def test_only_the_pipeline_imports_mlflow():
    graph = import_graph()
    assert sorted(m for m, edges in graph.items() if "mlflow" in edges and is_core(m)) == []


def test_voting_runs_where_mlflow_is_not_installed():
    code = """
import sys
sys.modules["mlflow"] = None  # `import mlflow` now raises ModuleNotFoundError, as where it is not installed
from ttc_mlops.records import Record
import ttc_mlops.voting as voting
record = Record(problem_id="p", problem="1+1?", answer="2", level=1, subject=None,
                completions=["So \\\\boxed{2}", "So \\\\boxed{3}"], step_scores=[[0.9], [0.4]], agg_scores=[0.9, 0.4],
                completion_tokens=[3, 3], finish_reasons=["eos", "eos"], selected=0, pred="2",
                approach="best_of_n", agg_strategy="last")
ev = voting.evaluate_records([record], "last", workers=1)
print(ev.at(1)["acc_naive"], ev.at(2)["pass"], "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1.0", "1.0", "False"]
