"""Step-level beam search over a PRM, batched across problems.

    ttc run recipes/SmolLM2-135M-Instruct/beam_search.yaml --set n=8 beam_width=2

Per problem, N partial solutions grow one step (up to a blank line) per iteration; the PRM scores
them, the best N / M are kept and each is expanded M times. A beam that ends (EOS, out of tokens, a
`\\boxed{}` answer) is finished; the last iteration writes every remaining beam to its end.

What differs from search-and-learn's beam search, on purpose:
- every problem of the batch is searched at once (`run_steps`): all beams of all problems go to the
  policy together, and a problem whose candidates are back is scored and expanded while the others
  still generate (on a backend that takes requests while it runs), or, on one that runs in waves,
  one generate call per iteration (plus one per lookahead step) and one PRM call for all problems;
- beams are never padded with copies. With fewer than N / M live beams a problem gets fewer
  candidates that iteration, and with fewer than N finished beams fewer completions; its record's
  notes say so. `filter_duplicates` drops identical partial solutions before selection;
- more than N finished beams are cut to the best N by aggregated score with `sort_completed`
  (the recipes set it), else to the first N to finish, best first within an iteration;
- every step is a node of the record's `tree` (parent links, scores, status), so the search can be
  redrawn; all completions share one group (a beam search at N cannot be subsampled to a smaller N).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data import Problem
from ..policy import Generation, Policy
from ..prm import PRM, aggregate
from ..records import Record, TreeNode
from .common import Candidate, ended, make_record, own_scores, run_steps, sample_seed, step_node


@dataclass
class _Beam:
    node: int | None  # its last step in the problem's tree; None is the empty solution
    text: str = ""  # the partial solution
    tokens: int = 0  # completion tokens of `text`


@dataclass
class _Finished:
    beam: _Beam
    scores: list[float]  # per step, of the beam's own text
    agg: float
    finish: str


@dataclass
class _Search:
    problem: Problem
    prompt: str
    recipe: object
    frontier: list[tuple[_Beam, int]]  # beams to expand and how many times
    tree: list[TreeNode] = field(default_factory=list)
    finished: list[_Finished] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parents: list[_Beam] = field(default_factory=list)  # the beam each candidate of this iteration extends

    # generate: one step for every expansion of every beam
    def expansions(self, it: int) -> list[tuple[str, int]]:
        self.parents = [beam for beam, k in self.frontier for _ in range(k)]
        return [(self.prompt + beam.text, sample_seed(self.recipe.seed, self.problem.problem_id, it, j))
                for j, beam in enumerate(self.parents)]

    # score: one row, the candidates with their lookahead
    def rows(self, cands: list[Candidate]) -> list[list[str]]:
        return [[beam.text + c.step.text + c.look for beam, c in zip(self.parents, cands)]]

    # select: finished beams leave, the best N / M live ones are kept
    def select(self, cands: list[Candidate], scores: list[list[list[float]]], it: int) -> None:
        _select(self, [(beam, c.step, c.look, sc) for beam, c, sc in zip(self.parents, cands, scores[0])],
                self.recipe, it)


def beam_search(problems: list[Problem], policy: Policy, prm: PRM, recipe) -> list[Record]:
    searches = [_Search(p, policy.chat_prompt(recipe.system_prompt, p.problem), recipe, [(_Beam(None), recipe.n)])
                for p in problems]
    run_steps(searches, policy, prm, recipe)
    return [_record(s, recipe) for s in searches]


def _select(s: _Search, cands: list[tuple[_Beam, Generation, str, list[float]]], recipe, it: int) -> None:
    n, width = recipe.n, recipe.beam_width
    last = it == recipe.num_iterations - 1
    live: list[tuple[float, _Beam]] = []
    finished: list[_Finished] = []
    for parent, step, look, scores in cands:
        beam = _Beam(len(s.tree), parent.text + step.text, parent.tokens + step.num_tokens)
        agg = aggregate(scores, recipe.agg_strategy)
        own = own_scores(scores, beam.text, look)
        s.tree.append(step_node(beam.node, parent.node, it, step, look, own, agg, "pruned"))
        if last or ended(step):
            s.tree[beam.node].status = "finished"
            finished.append(_Finished(beam, own, aggregate(own, recipe.agg_strategy), step.finish_reason))
        else:
            live.append((agg, beam))
    s.finished += sorted(finished, key=lambda f: -f.agg)  # stable: ties keep generation order

    ranked = sorted(live, key=lambda ab: -ab[0])
    if recipe.filter_duplicates:
        seen: set[str] = set()
        unique = []
        for agg, beam in ranked:
            if beam.text in seen:
                s.tree[beam.node].status = "duplicate"
            else:
                seen.add(beam.text)
                unique.append((agg, beam))
        ranked = unique
    keep = [beam for _, beam in ranked[: n // width]]
    for beam in keep:
        s.tree[beam.node].status = "kept"
    s.frontier = [(beam, width) for beam in keep]
    if keep and len(keep) < n // width and not last:
        s.notes.append(f"iteration {it + 1}: {len(keep)} of n/beam_width={n // width} beams live, "
                       f"{len(keep) * width} candidates next (no padding)")


def _record(s: _Search, recipe) -> Record:
    n = recipe.n
    finished = s.finished
    if len(finished) > n:
        how = "best by aggregated score (sort_completed)" if recipe.sort_completed else "first to finish"
        s.notes.append(f"{len(finished)} beams finished; kept the {n} {how}")
        finished = sorted(finished, key=lambda f: -f.agg)[:n] if recipe.sort_completed else finished[:n]
    elif len(finished) < n:
        s.notes.append(f"{len(finished)} of n={n} beams finished (no padding)")
    for i, f in enumerate(finished):
        s.tree[f.beam.node].completion = i
    return make_record(s.problem, recipe, [f.beam.text for f in finished], [f.scores for f in finished],
                       [f.beam.tokens for f in finished], [f.finish for f in finished],
                       groups=[0] * len(finished), tree=s.tree, notes=s.notes)
