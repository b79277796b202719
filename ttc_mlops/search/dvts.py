"""Diverse verifier tree search (DVTS): N / M independent subtrees, each following the PRM's best step.

    ttc run recipes/SmolLM2-135M-Instruct/dvts.yaml --set n=8 beam_width=2

Every iteration, every live subtree of every problem samples M candidate steps (one generate call
for the whole batch), the PRM scores them (one call), and the subtree continues with the best one.
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
from .common import ended, expand, make_record, own_scores, sample_seed, step_node


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
class _Search:
    problem: Problem
    prompt: str
    subtrees: list[_Subtree]
    tree: list[TreeNode] = field(default_factory=list)


def dvts(problems: list[Problem], policy: Policy, prm: PRM, recipe) -> list[Record]:
    width = recipe.beam_width
    searches = [_Search(p, policy.chat_prompt(recipe.system_prompt, p.problem),
                        [_Subtree(i) for i in range(recipe.n // width)]) for p in problems]
    for it in range(recipe.num_iterations):
        last = it == recipe.num_iterations - 1
        live = [(s, t) for s in searches for t in s.subtrees if t.live]
        if not live:
            break

        # generate: M candidate steps for every live subtree of every problem
        steps, looks = expand(policy, [s.prompt + t.text for s, t in live for _ in range(width)],
                              [sample_seed(recipe.seed, s.problem.problem_id, it, t.index, j)
                               for s, t in live for j in range(width)], recipe, last)

        # score: one row per subtree (subtrees never see each other's candidates)
        scores = prm.score([s.problem.problem for s, _ in live],
                           [[t.text + steps[k].text + looks[k] for k in range(i * width, (i + 1) * width)]
                            for i, (s, t) in enumerate(live)])

        # select: each subtree follows its best candidate
        for i, ((s, t), row) in enumerate(zip(live, scores)):
            ks = range(i * width, (i + 1) * width)
            _follow_best(s, t, [steps[k] for k in ks], [looks[k] for k in ks], row, recipe, it)

    return [_record(s, recipe) for s in searches]


def _follow_best(s: _Search, t: _Subtree, steps: list[Generation], looks: list[str], scores: list[list[float]],
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


def _record(s: _Search, recipe) -> Record:
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
