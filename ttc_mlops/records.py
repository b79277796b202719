"""The per-problem record: everything a search produced, enough to re-evaluate without a model.

    python -c "from ttc_mlops.records import Record; print(list(Record.__dataclass_fields__))"
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

RECORD_VERSION = 1


@dataclass
class TreeNode:
    """One generated step of a step-level search; a completion is the path from its leaf to the root."""
    id: int  # index in the record's tree
    parent: int | None  # the step it continues; None under the prompt
    iteration: int
    step: str  # the sampled text, ending at the step delimiter unless the solution ended
    lookahead: str  # greedy steps rolled out after it, scored but not kept
    tokens: int  # completion tokens of `step`
    finish: str  # stop / eos / length
    step_score: float | None  # the PRM's score of this step
    agg: float  # the path's step scores aggregated with agg_strategy (what selection compared)
    status: str  # beam search: kept / pruned / duplicate / finished; DVTS: chosen / rejected
    completion: int | None = None  # the completion this leaf became, if any
    subtree: int | None = None  # DVTS: the subtree it belongs to

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TreeNode":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Record:
    problem_id: str
    problem: str
    answer: str | None  # gold
    level: int | None
    subject: str | None
    completions: list[str]
    step_scores: list[list[float]]  # per completion, per step, in [0, 1]
    agg_scores: list[float]  # per completion, aggregated with agg_strategy
    completion_tokens: list[int | None]  # per completion; None where a backend cannot tell
    finish_reasons: list[str]  # stop / eos / length per completion
    selected: int | None  # index of the chosen completion (highest aggregated score among finished ones)
    pred: str | None  # the chosen completion's extracted answer
    approach: str
    agg_strategy: str
    groups: list[int] = field(default_factory=list)  # per completion: its beam / subtree (voting keeps groups whole)
    tree: list[TreeNode] = field(default_factory=list)  # every generated step (step-level search)
    notes: list[str] = field(default_factory=list)  # e.g. "3 of 4 beams survived"
    # per completion: False for a solution that stopped mid-way (a DVTS candidate of a subtree's last
    # iteration that ended at a step); it gives no answer. Empty in records written before this field.
    finished: list[bool] = field(default_factory=list)
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        missing = [f for f in ("problem_id", "completions", "agg_scores") if f not in data]
        if missing:
            raise ValueError(f"not a ttc_mlops record (missing {missing})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["tree"] = [TreeNode.from_dict(node) for node in known.get("tree") or []]
        return cls(**known)


def write_records(records: Iterable[Record], path: Path) -> Path:
    """jsonl, gzip-compressed when the name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_records(path: Path) -> list[Record]:
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    records.append(Record.from_dict(json.loads(line)))
    except (OSError, EOFError, json.JSONDecodeError, ValueError, TypeError) as err:
        raise ValueError(f"record file {path} is corrupt: {err}") from None
    return records


def records_digest(records: list[Record]) -> str:
    """A short hash of the records' content: what evaluate graded, whether it changed."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def problem_set_digest(problem_ids: Iterable[str]) -> str:
    """A short hash of which problems a record set covers (order ignored): runs compared side by
    side must have graded the same problems."""
    return hashlib.sha256("\n".join(sorted(problem_ids)).encode()).hexdigest()[:12]
