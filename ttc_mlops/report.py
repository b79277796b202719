"""The search of every problem as a page a person reads: its completions, scores and answers, and for
beam search and DVTS the tree of steps (kept, pruned, chosen, finished) that produced them.

    python -c "from ttc_mlops.report import search_html; print(search_html([], {})[:80])"

`ttc evaluate` logs it as `eval/search-*.html` (50 problems a page), which the MLflow UI shows in its
artifact view; plain HTML and CSS (collapsible `<details>`), no script, since the UI shows artifacts
in a sandboxed frame. A large tree shows the paths that led to completions and kept beams in full,
and each parent's pruned or rejected children as one summary line.
"""

from __future__ import annotations

from html import escape

from .records import Record, TreeNode

PAGE = 50  # problems a page
SHOWN_CHARS = 400  # characters of a step shown before it folds
FULL_TREE = 60  # nodes below which every node is drawn

_CSS = """
body{font:13px/1.45 system-ui,sans-serif;margin:12px;color:#222}
details{margin:4px 0}summary{cursor:pointer}
.p{border:1px solid #ccc;border-radius:6px;padding:6px 10px;margin:8px 0}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.und{color:#8a6d00;font-weight:600}
.n{margin-left:18px;border-left:2px solid #ddd;padding-left:8px}
.kept,.chosen{border-color:#137333}.finished{border-color:#1a56db}.pruned,.rejected,.duplicate{border-color:#ccc;color:#777}
.tag{font-size:11px;padding:0 4px;border-radius:3px;background:#eee;margin-right:4px}
pre{white-space:pre-wrap;margin:2px 0;font:12px/1.4 ui-monospace,monospace}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
"""


def _verdict(value: bool | None) -> str:
    if value is None:
        return '<span class="und">undecided</span>'
    return '<span class="ok">right</span>' if value else '<span class="bad">wrong</span>'


def _text(text: str) -> str:
    if len(text) <= SHOWN_CHARS:
        return f"<pre>{escape(text)}</pre>"
    return f"<details><summary><pre>{escape(text[:SHOWN_CHARS])} ...</pre></summary><pre>{escape(text)}</pre></details>"


def _score(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _node(node: TreeNode, children: dict[int | None, list[TreeNode]], full: bool) -> str:
    label = (f'<span class="tag">it {node.iteration}</span><span class="tag">{node.status}</span>'
             f'<span class="tag">step {_score(node.step_score)}</span><span class="tag">agg {_score(node.agg)}</span>'
             + (f'<span class="tag">completion {node.completion}</span>' if node.completion is not None else "")
             + (f'<span class="tag">subtree {node.subtree}</span>' if node.subtree is not None else "")
             + (f'<span class="tag">sweep {node.sweep}</span>' if node.sweep is not None else "")
             + (f'<span class="tag">weight {_score(node.weight)}</span>' if node.weight is not None else "")
             + (f'<span class="tag">drawn x{node.copies}</span>' if node.copies is not None else ""))
    body = _text(node.step) + (f"<i>lookahead</i>{_text(node.lookahead)}" if node.lookahead else "")
    return f'<div class="n {node.status}">{label}{body}{_children(node.id, children, full)}</div>'


def _children(parent: int | None, children: dict[int | None, list[TreeNode]], full: bool) -> str:
    nodes = children.get(parent, [])
    if full:
        return "".join(_node(c, children, full) for c in nodes)
    live = [c for c in nodes if c.status not in ("pruned", "rejected", "duplicate", "dropped") or c.id in children]
    dropped = [c for c in nodes if c not in live]
    out = "".join(_node(c, children, full) for c in live)
    if dropped:
        best = max((c.agg for c in dropped if c.agg is not None), default=None)
        out += (f'<div class="n pruned">+{len(dropped)} {"/".join(sorted({c.status for c in dropped}))} '
                f"(best agg {_score(best)})</div>")
    return out


def tree_html(tree: list[TreeNode]) -> str:
    children: dict[int | None, list[TreeNode]] = {}
    for node in tree:
        children.setdefault(node.parent, []).append(node)
    return _children(None, children, full=len(tree) <= FULL_TREE)


def problem_html(record: Record, row: dict | None, open_: bool = False) -> str:
    """One problem: the verdict line, its completions, its tree (unfolded when `open_`)."""
    row = row or {}
    head = (f"<b>{escape(record.problem_id)}</b> level {record.level} &middot; gold <code>{escape(str(record.answer))}"
            f"</code> &middot; selected <code>{escape(str(row.get('selected')))}</code> {_verdict(row.get('correct'))}"
            f" &middot; weighted vote <code>{escape(str(row.get('weighted_vote')))}</code>")
    finished = record.finished or [True] * len(record.completions)
    lines = "".join(
        f"<tr><td>{i}{' (selected)' if i == record.selected else ''}</td><td>{_score(record.agg_scores[i])}</td>"
        f"<td>{record.completion_tokens[i]}</td><td>{record.finish_reasons[i]}{'' if finished[i] else ', unfinished'}"
        f"</td><td>{_text(c)}</td></tr>"
        for i, c in enumerate(record.completions))
    table = f"<table><tr><th>#</th><th>score</th><th>tokens</th><th>finish</th><th>completion</th></tr>{lines}</table>"
    notes = "".join(f"<li>{escape(n)}</li>" for n in record.notes)
    unfold = " open" if open_ else ""
    tree = f"<details{unfold}><summary>search tree ({len(record.tree)} steps)</summary>{tree_html(record.tree)}</details>" \
        if record.tree else ""
    return (f'<details class="p"{unfold}><summary>{head}</summary><p>{escape(record.problem)}</p>'
            f"{'<ul>' + notes + '</ul>' if notes else ''}{table}{tree}</details>")


def search_html(records: list[Record], rows: dict[str, dict], title: str = "search") -> str:
    """A page of problems; `rows` are voting.problem_rows by problem id (verdicts, picks)."""
    body = "".join(problem_html(r, rows.get(r.problem_id), open_=i == 0) for i, r in enumerate(records))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{_CSS}</style>"
            f"</head><body><h3>{escape(title)}</h3>{body}</body></html>")


def pages(records: list[Record]) -> list[tuple[str, list[Record]]]:
    """(file name, records) per page of PAGE problems."""
    return [(f"search-{i:04d}-{min(i + PAGE, len(records)) - 1:04d}.html", records[i : i + PAGE])
            for i in range(0, len(records), PAGE)]
