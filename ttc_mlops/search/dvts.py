"""Diverse verifier tree search (DVTS): N / M independent subtrees, each following the PRM's best step.

    ttc run recipes/SmolLM2-135M-Instruct/dvts.yaml --set n=8 beam_width=2

Every iteration, every live subtree of a problem samples M candidate steps, the PRM scores them,
and the subtree continues with the best one. All problems of the batch are searched at once
(`run_steps`), and subtrees apart: a subtree whose candidates are back is scored and moves on while
the others, of its problem too, still generate.
A subtree stops when its chosen step ends the solution (EOS, out of tokens, a `\\boxed{}` answer);
the last iteration writes each live subtree to its end. The output keeps the M candidates of each
subtree's last iteration, so a problem has N completions, grouped by subtree (voting at a smaller
n keeps subtrees whole, which is exactly DVTS at that n: subtrees are seeded independently).

Unlike search-and-learn's DVTS, completions carry real token counts (the subtree's chosen steps
plus the candidate's own), `max_tokens` is the recipe's, and every candidate step is a node of the
record's `tree`. As in the reference, a subtree's other candidates are returned even when they
stopped at a step mid-solution; here they are marked (`Record.finished` False, a note) and give no
answer: they are never selected and never vote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data import Problem
from ..policy import Generation, Policy
from ..prm import PRM, aggregate
from ..records import Record, TreeNode
from .common import Candidate, ended, make_record, own_scores, run_steps, sample_seed, step_node


@dataclass
class _Candidate:
    text: str  # the subtree's chosen steps plus this candidate step
    scores: list[float]  # per step, of `text`
    tokens: int  # completion tokens of `text`
    finish: str
    node: int  # this step in the problem's tree
    finished: bool  # the solution ended (EOS, out of tokens, an answer, the last iteration); else it
    # stopped at a step: the reference returns it all the same, here it is marked and gives no answer


@dataclass
class _Subtree:
    index: int
    node: int | None = None  # its chosen last step in the problem's tree
    text: str = ""  # the chosen steps so far
    tokens: int = 0  # completion tokens of `text`
    live: bool = True
    last: list[_Candidate] = field(default_factory=list)  # the candidates of its last iteration


@dataclass
class _Problem:
    problem: Problem
    subtrees: list[_Subtree]
    tree: list[TreeNode] = field(default_factory=list)  # in the order subtrees chose; renumbered at the end


@dataclass
class _Search:
    """One subtree's search: subtrees never see each other's candidates, so each moves on as soon as
    its own candidates are back (`run_steps`), not when its problem's slowest subtree is."""
    owner: _Problem
    subtree: _Subtree
    prompt: str
    recipe: object

    @property
    def problem(self) -> Problem:
        return self.owner.problem

    # generate: M candidate steps while the subtree is live
    def expansions(self, it: int) -> list[tuple[str, int]]:
        t = self.subtree
        if not t.live:
            return []
        return [(self.prompt + t.text, sample_seed(self.recipe.seed, self.problem.problem_id, it, t.index, j))
                for j in range(self.recipe.beam_width)]

    # score: the subtree's candidates in one row
    def rows(self, cands: list[Candidate]) -> list[list[str]]:
        return [[self.subtree.text + c.step.text + c.look for c in cands]]

    # select: the subtree follows its best candidate
    def select(self, cands: list[Candidate], scores: list[list[list[float]]], it: int) -> None:
        _follow_best(self.owner, self.subtree, [c.step for c in cands], [c.look for c in cands], scores[0],
                     self.recipe, it)


def dvts(problems: list[Problem], policy: Policy, prm: PRM, recipe) -> list[Record]:
    owners = [_Problem(p, [_Subtree(i) for i in range(recipe.subtrees)]) for p in problems]
    prompts = [policy.chat_prompt(recipe.system_prompt, o.problem.problem) for o in owners]
    searches = [_Search(o, t, prompt, recipe) for o, prompt in zip(owners, prompts) for t in o.subtrees]
    run_steps(searches, policy, prm, recipe)
    return [_record(o, recipe) for o in owners]


def _follow_best(s: _Problem, t: _Subtree, steps: list[Generation], looks: list[str], scores: list[list[float]],
                 recipe, it: int) -> None:
    aggs = [aggregate(sc, recipe.agg_strategy) for sc in scores]
    best = max(range(len(steps)), key=aggs.__getitem__)  # ties: the first candidate
    last = it == recipe.num_iterations - 1
    t.last = []
    for j, (step, look, sc) in enumerate(zip(steps, looks, scores)):
        text = t.text + step.text
        node = len(s.tree)
        own = own_scores(sc, text, look)
        s.tree.append(step_node(node, t.node, it, step, look, own, aggs[j], "chosen" if j == best else "rejected",
                                subtree=t.index))
        t.last.append(_Candidate(text, own, t.tokens + step.num_tokens, step.finish_reason, node,
                                 finished=last or ended(step)))
    t.node, t.text, t.tokens = t.last[best].node, t.last[best].text, t.last[best].tokens
    t.live = not t.last[best].finished


def _renumber(s: _Problem) -> None:
    """Number the tree as a lockstep search appends it (iteration, then subtree, then candidate),
    whatever order the subtrees moved on in."""
    nodes = sorted(s.tree, key=lambda n: (n.iteration, n.subtree))  # stable: candidates stay in order
    new = {n.id: i for i, n in enumerate(nodes)}
    for n in nodes:
        n.id, n.parent = new[n.id], None if n.parent is None else new[n.parent]
    for t in s.subtrees:
        t.node = new[t.node] if t.node is not None else None
        for c in t.last:
            c.node = new[c.node]
    s.tree = nodes


def _record(s: _Problem, recipe) -> Record:
    _renumber(s)
    outputs = [(t.index, c) for t in s.subtrees for c in t.last]
    for i, (_, c) in enumerate(outputs):
        s.tree[c.node].completion = i
    depths = [1 + max(node.iteration for node in s.tree if node.subtree == t.index) for t in s.subtrees]
    notes = [f"dvts: {len(s.subtrees)} subtrees x beam_width={recipe.beam_width}; steps per subtree {depths}"]
    unfinished = sum(not c.finished for _, c in outputs)
    if unfinished:
        notes.append(f"{unfinished} of {len(outputs)} completions unfinished (candidates that stopped at a step "
                     f"beside their subtree's last step): kept as the reference does, they give no answer")
    return make_record(s.problem, recipe, [c.text for _, c in outputs], [c.scores for _, c in outputs],
                       [c.tokens for _, c in outputs], [c.finish for _, c in outputs],
                       groups=[g for g, _ in outputs], tree=s.tree, notes=notes,
                       finished=[c.finished for _, c in outputs])
