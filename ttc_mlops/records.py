"""The per-problem record: everything a search produced, enough to re-evaluate without a model.

    python -c "from ttc_mlops.records import Record; print(list(Record.__dataclass_fields__))"
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

RECORD_VERSION = 1


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
    selected: int | None  # index of the chosen completion (highest aggregated score)
    pred: str | None  # the chosen completion's extracted answer
    approach: str
    agg_strategy: str
    groups: list[int] = field(default_factory=list)  # per completion: its beam / subtree (voting keeps groups whole)
    tree: list[dict[str, Any]] = field(default_factory=list)  # step nodes with parent links (step-level search)
    notes: list[str] = field(default_factory=list)  # e.g. "3 of 4 beams survived"
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        missing = [f for f in ("problem_id", "completions", "agg_scores") if f not in data]
        if missing:
            raise ValueError(f"not a ttc_mlops record (missing {missing})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
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
