"""Each sampled problem's search as an MLflow trace on its parent run, written from the records.

    ttc evaluate recipes/SmolLM2-135M-Instruct/beam_search.yaml --set trace_problems=50

`ttc evaluate` writes one trace per problem of a stable sample (`trace_problems` of them, every
problem when there are fewer), linked to the parent run, so the UI's Traces tab reads a search the
way it reads an agent: a root span with the problem and gold answer as inputs, the selected answer
and its verdict as outputs (with each iteration's best step score and how many steps were kept and
pruned, the search at a glance); under it one span per iteration (the partial solutions continued, every
candidate step with its tokens, step score, aggregated score and whether it was kept or pruned) and
a last `select` span. Trace tags (`ttc.correct`, `ttc.level`, `ttc.strategy`, `ttc.n`,
`ttc.problem_id`) let the UI filter, e.g. `tags.ttc.correct = 'false' AND tags.ttc.level = '5'`.

Traces are built from the records alone (`trace_spans`, no model, nothing written back to a
record), so an old run is traced by evaluating it again. A parent keeps one set of traces: the ones
of its current merged records and `trace_problems`; evaluating again with the same ones writes
nothing, with other ones replaces them (tag `ttc.traced` says which were written).

Records keep no per-step timings: a span's start orders it among its siblings (1 microsecond
apart) and its duration is 0. Speed: the spans are made in memory and the whole sample goes to the
store in one `log_spans` call, which creates every trace (its tags from the root span) in one
transaction, then one `link_traces_to_run` per 100 traces ties them to the parent. Through
`MlflowClient.start_trace` / `start_span` each span was a store transaction of its own (about 0.4 s
a trace here), and a `start_trace` per trace still cost more than the rest of tracing together
(docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from typing import Any

from .. import names
from ..records import Record, TreeNode

log = logging.getLogger(__name__)

LINK_BATCH = 100  # trace ids per link / delete call (MLflow's limit for links)


def sample(records: list[Record], k: int) -> list[Record]:
    """k records chosen by a hash of their problem id (the same problems whichever chunking or run
    order made them; every record when there are k or fewer), in their own order."""
    if k <= 0:
        return []
    if len(records) <= k:
        return list(records)
    chosen = set(sorted(range(len(records)), key=lambda i: hashlib.sha256(records[i].problem_id.encode()).hexdigest())[:k])
    return [r for i, r in enumerate(records) if i in chosen]


def verdict(row: dict | None) -> str:
    """The trace tag ttc.correct: true | false | undecided (the grader could not tell) | ungraded (no gold)."""
    if row is None:
        return "ungraded"
    return {True: "true", False: "false", None: "undecided"}[row.get("correct")]


def trace_spans(record: Record, row: dict | None, recipe) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The trace of one record as plain data: (root, children), each a dict with name, span_type,
    inputs, outputs, attributes and (children) parent: the index of its parent among the children, or
    None under the root. Reads the record only."""
    selected = record.selected
    root = {
        "name": record.problem_id, "span_type": "CHAIN",
        "inputs": {"problem_id": record.problem_id, "problem": record.problem, "gold": record.answer,
                   "level": record.level, "subject": record.subject},
        "outputs": {"answer": record.pred, "correct": None if row is None else row.get("correct"),
                    "verdict": verdict(row), "score": None if selected is None else record.agg_scores[selected],
                    "completion": None if selected is None else record.completions[selected],
                    "weighted_vote": None if row is None else row.get("weighted_vote"),
                    "pass": None if row is None else row.get("pass")},
        "attributes": {"strategy": record.approach, "n": recipe.n, "agg_strategy": record.agg_strategy,
                       "completions": len(record.completions),
                       "completion_tokens": sum(t for t in record.completion_tokens if t is not None),
                       "notes": "; ".join(record.notes)},
    }
    children = _iteration_spans(record) if record.tree else [_sample_span(record)]
    # the search at a glance where the UI opens a trace (its root): per iteration, its best step score and statuses
    root["outputs"]["iterations"] = [{"span": c["name"], **{k: v for k, v in c["attributes"].items() if k != "tokens"}}
                                     for c in children]
    children.append({
        "name": "select", "span_type": "RERANKER", "parent": None,
        "inputs": {"agg_scores": record.agg_scores, "finished": record.finished or None, "agg_strategy": record.agg_strategy},
        "outputs": {"selected": selected, "answer": record.pred},
        "attributes": {"selected": selected},
    })
    return root, children


def _iteration_spans(record: Record) -> list[dict[str, Any]]:
    """One span per iteration (per sweep and iteration for particle Gibbs): the partial solutions it
    continued, as the node ids of their steps (a prompt is the system prompt, the problem and the
    text of those steps, each in the span of its own iteration; writing the texts out again here
    doubled a trace's size), every step it sampled with its score, and which were kept or pruned."""
    by_id = {node.id: node for node in record.tree}
    paths: dict[int, list[int]] = {}

    def path(node_id: int) -> list[int]:  # the steps of the partial solution ending at this node
        if node_id not in paths:
            node = by_id[node_id]
            paths[node_id] = (path(node.parent) if node.parent is not None else []) + [node_id]
        return paths[node_id]

    rounds: dict[tuple[int, int], list[TreeNode]] = defaultdict(list)
    for node in record.tree:
        rounds[(node.sweep or 0, node.iteration)].append(node)
    spans = []
    for (sweep, iteration), nodes in sorted(rounds.items()):
        parents = list(dict.fromkeys(n.parent for n in nodes))
        status: dict[str, list[int]] = defaultdict(list)
        for n in nodes:
            status[n.status].append(n.id)
        scores = [n.step_score for n in nodes if n.step_score is not None]
        spans.append({
            "name": f"iteration {iteration}" + (f" (sweep {sweep})" if sweep else ""), "span_type": "CHAIN", "parent": None,
            "inputs": {"prompts": [{"continues": p, "steps": path(p) if p is not None else []} for p in parents]},
            "outputs": {"candidates": [_candidate(n) for n in nodes], "status": dict(status)},
            "attributes": {"iteration": iteration, "candidates": len(nodes), "tokens": sum(n.tokens for n in nodes),
                           "best_step_score": max(scores) if scores else None,
                           **{f"status.{k}": len(v) for k, v in status.items()}},
        })
    return spans


def _candidate(node: TreeNode) -> dict[str, Any]:
    found = {"node": node.id, "parent": node.parent, "step": node.step, "tokens": node.tokens, "finish": node.finish,
             "step_score": node.step_score, "agg": node.agg, "status": node.status}
    for key in ("lookahead", "completion", "subtree", "weight", "copies"):
        value = getattr(node, key)
        if value not in (None, ""):
            found[key] = value
    return found


def _sample_span(record: Record) -> dict[str, Any]:
    """Best-of-N and other searches without a step tree: one round of whole completions."""
    return {
        "name": "sample and score", "span_type": "CHAIN", "parent": None,
        "inputs": {"completions": len(record.completions)},
        "outputs": {"candidates": [{"completion": i, "text": c, "tokens": t, "finish": f, "step_scores": s, "agg": a,
                                    **({"group": record.groups[i]} if i < len(record.groups) else {})}
                                   for i, (c, t, f, s, a) in enumerate(zip(record.completions, record.completion_tokens,
                                                                           record.finish_reasons, record.step_scores,
                                                                           record.agg_scores))]},
        "attributes": {"candidates": len(record.completions),
                       "tokens": sum(t for t in record.completion_tokens if t is not None)},
    }


def trace_tags(record: Record, row: dict | None, recipe, records_digest: str) -> dict[str, str]:
    from mlflow.tracing.constant import TraceTagKey

    return {TraceTagKey.TRACE_NAME: record.problem_id, names.TRACE_TAG_PROBLEM: record.problem_id,
            names.TRACE_TAG_CORRECT: verdict(row), names.TRACE_TAG_LEVEL: str(record.level) if record.level is not None else "",
            names.TRACE_TAG_STRATEGY: record.approach, names.TRACE_TAG_N: str(recipe.n),
            names.TRACE_TAG_RECORDS: records_digest}


def build_traces(records: list[Record], rows: dict[str, dict], recipe, records_digest: str) -> list[list[Any]]:
    """Each record's trace as finished MLflow spans, root first, made in memory by an OpenTelemetry
    tracer of this module's own (nothing is exported until `log_traces` sends them). The trace tags
    ride on the root span as `mlflow.traceTag.<key>` attributes, which the store turns into tags when
    it creates the trace from its spans (MLflow's OpenTelemetry ingest)."""
    from mlflow.entities import LiveSpan
    from mlflow.tracing.constant import SpanAttributeKey
    from mlflow.tracing.utils import generate_trace_id_v3
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("ttc_mlops.traces")
    now = time.time_ns()
    built = []
    for i, record in enumerate(records):
        row = rows.get(record.problem_id)
        root_data, children = trace_spans(record, row, recipe)
        start = now + i * 1000 * (len(children) + 2)
        root = tracer.start_span(root_data["name"], start_time=start)
        trace_id = generate_trace_id_v3(root)
        live_root = _fill(LiveSpan(root, trace_id, root_data["span_type"]), root_data)
        for key, value in trace_tags(record, row, recipe, records_digest).items():
            root.set_attribute(SpanAttributeKey.TRACE_TAG_PREFIX + key, value)
        context = otel.set_span_in_context(root)
        spans = []
        for j, child in enumerate(children):
            otel_span = tracer.start_span(child["name"], context=context, start_time=start + (j + 1) * 1000)
            live = _fill(LiveSpan(otel_span, trace_id, child["span_type"]), child)
            otel_span.end(end_time=start + (j + 1) * 1000)
            spans.append(live.to_immutable_span())
        root.end(end_time=start + (len(children) + 1) * 1000)
        built.append([live_root.to_immutable_span(), *spans])
    return built


def _fill(span, data: dict[str, Any]):
    """Inputs, outputs and attributes as span attributes (`set_inputs` / `set_outputs` would also walk
    every value looking for attachments: a third of the cost, and records hold none)."""
    from mlflow.tracing.constant import SpanAttributeKey

    span.set_attributes({SpanAttributeKey.INPUTS: data["inputs"], SpanAttributeKey.OUTPUTS: data["outputs"],
                         **{k: v for k, v in data["attributes"].items() if v is not None}})
    return span


def parent_traces(experiment_id: str, run_id: str) -> list:
    """The traces this module wrote for a parent run (trace info only, no spans)."""
    from . import store

    found, token = [], None
    while True:
        page = store.client().search_traces(locations=[experiment_id], run_id=run_id, include_spans=False,
                                            max_results=500, page_token=token)
        found += [t for t in page if names.TRACE_TAG_RECORDS in t.info.tags]
        token = page.token
        if not token:
            return found


def log_traces(parent_id: str, recipe, records: list[Record], rows: dict[str, dict], records_digest: str) -> list[str]:
    """Write the sample's traces on the parent (replacing the ones it had), tag it `ttc.traced`, and
    return the new trace ids. Nothing when `trace_problems` is 0 or these records and sample size
    were traced already."""
    from mlflow.tracing.client import TracingClient

    from . import store

    want = f"{records_digest}:{recipe.trace_problems}"
    run = store.get_run(parent_id)
    if recipe.trace_problems == 0 or run.data.tags.get(names.TAG_TRACED) == want:
        return []
    experiment_id = run.info.experiment_id
    old = [t.info.trace_id for t in parent_traces(experiment_id, parent_id)]
    for start in range(0, len(old), LINK_BATCH):
        store.client().delete_traces(experiment_id, trace_ids=old[start : start + LINK_BATCH])
    built = build_traces(sample(records, recipe.trace_problems), rows, recipe, records_digest)
    # every span of every trace in one call: the store creates the traces (tags from the roots) in one
    # transaction, where a start_trace per trace was one commit each
    TracingClient(store.tracking_uri()).log_spans(experiment_id, [span for spans in built for span in spans])
    ids = [spans[0].trace_id for spans in built]
    for start in range(0, len(ids), LINK_BATCH):  # the run's Traces tab, search_traces(run_id=...)
        store.client().link_traces_to_run(ids[start : start + LINK_BATCH], parent_id)
    store.set_tags(parent_id, {names.TAG_TRACED: want})
    log.info("parent %s: %d traces written%s", parent_id, len(built), f" ({len(old)} older ones replaced)" if old else "")
    return ids
