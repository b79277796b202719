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
PARTICLE_FIELDS = ("sweep", "weight", "copies")  # TreeNode fields only particle filtering writes


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
    # beam search: kept / pruned / duplicate / finished; DVTS: chosen / rejected;
    # particle filtering: resampled / dropped / finished
    status: str
    completion: int | None = None  # the completion this leaf became, if any
    subtree: int | None = None  # DVTS: the subtree it belongs to
    # particle filtering: the sweep (particle Gibbs) it was sampled in, its share of the resampling
    # draw (softmax of logit(step score) / pf_temperature over the live pool) and how many particles
    # were drawn from it; written only where a particle filter set them (PARTICLE_FIELDS)
    sweep: int | None = None
    weight: float | None = None
    copies: int | None = None

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
        data = asdict(self)
        for node in data["tree"]:  # other strategies' records read (and hash) as before these fields
            for key in PARTICLE_FIELDS:
                if node[key] is None:
                    del node[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        """A record from its JSON form, its fields' types checked (a record whose completions are
        null would merge as complete and break grading later)."""
        if not isinstance(data, dict):
            raise ValueError(f"not a ttc_mlops record: a JSON {type(data).__name__}")
        missing = [f for f in ("problem_id", "completions", "agg_scores") if f not in data]
        if missing:
            raise ValueError(f"not a ttc_mlops record (missing {missing})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        _check_types(known)
        known["tree"] = [TreeNode.from_dict(node) for node in known.get("tree") or []]
        return cls(**known)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# field -> (what it must be, the check); fields absent from old records keep their defaults
_FIELD_TYPES = {
    "problem_id": ("a string", lambda v: isinstance(v, str)),
    "problem": ("a string", lambda v: isinstance(v, str)),
    "completions": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
    "step_scores": ("a list of lists of numbers",
                    lambda v: isinstance(v, list) and all(isinstance(s, list) and all(map(_is_number, s)) for s in v)),
    "agg_scores": ("a list of numbers", lambda v: isinstance(v, list) and all(map(_is_number, v))),
    "completion_tokens": ("a list of integers or nulls",
                          lambda v: isinstance(v, list) and all(t is None or isinstance(t, int) for t in v)),
    "finish_reasons": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v)),
    "selected": ("an integer or null", lambda v: v is None or isinstance(v, int)),
    "groups": ("a list of integers", lambda v: isinstance(v, list) and all(isinstance(g, int) for g in v)),
    "finished": ("a list of booleans", lambda v: isinstance(v, list) and all(isinstance(f, bool) for f in v)),
    "tree": ("a list of step nodes", lambda v: isinstance(v, list) and all(isinstance(n, dict) for n in v)),
}


def _check_types(data: dict[str, Any]) -> None:
    for name, (expected, ok) in _FIELD_TYPES.items():
        if name in data and not ok(data[name]):
            raise ValueError(f"record {data.get('problem_id')!r}: {name}={repr(data[name])[:60]} is not {expected}")
    lengths = {f: len(data[f]) for f in ("step_scores", "agg_scores", "finish_reasons", "completion_tokens")
               if f in data}
    if any(n != len(data["completions"]) for n in lengths.values()):
        raise ValueError(f"record {data.get('problem_id')!r}: {len(data['completions'])} completions but {lengths}")


def write_records(records: Iterable[Record], path: Path) -> Path:
    """jsonl, gzip-compressed when the name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_records(path: Path) -> list[Record]:
    """Every record of a file, or ValueError naming what is wrong."""
    records, problem = read_records_tolerant(path)
    if problem is not None:
        raise ValueError(f"record file {path.name} is corrupt: {problem}")
    return records


def read_records_tolerant(path: Path) -> tuple[list[Record], str | None]:
    """The records up to the first one that cannot be read, and what was wrong there (None: nothing).
    A checkpoint cut off mid-write keeps what came before the cut."""
    opener = gzip.open if path.suffix == ".gz" else open
    records, lineno = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    records.append(Record.from_dict(json.loads(line)))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as err:
        return records, f"line {lineno + 1 if not records and lineno == 0 else lineno}: {err}"
    return records, None


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
