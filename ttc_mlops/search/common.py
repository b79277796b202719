"""What every strategy shares: per-request seeds, a problem's candidates -> Record, the step-level driver.

    python -c "from ttc_mlops.search.common import sample_seed; print(sample_seed(42, 'test/1.json', 0, 3))"
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from ..config import STEP_DELIMITER
from ..data import Problem
from ..grading import boxed_answer, extract_answer
from ..policy import Generation, Policy, Sampling, open_stream
from ..prm import PRM, aggregate, split_steps
from ..records import Record, TreeNode


def sample_seed(seed: int, problem_id: str, *path: int) -> int:
    """A seed for one request, from the run seed, the problem and the request's place in the search.
    It ignores batch and chunk, so a problem's samples are the same wherever it runs."""
    key = f"{seed}|{problem_id}|" + ".".join(map(str, path))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def make_record(problem: Problem, recipe, completions: list[str], step_scores: list[list[float]],
                tokens: list[int | None], finish: list[str], groups: list[int] | None = None,
                tree: list[TreeNode] | None = None, notes: list[str] | None = None,
                finished: list[bool] | None = None) -> Record:
    """The record of a problem; the selected completion is the best-scored finished one (an
    unfinished one gives no answer), the first of equal scores."""
    agg = [aggregate(s, recipe.agg_strategy) for s in step_scores]
    finished = finished if finished is not None else [True] * len(completions)
    eligible = [i for i in range(len(agg)) if finished[i]]
    selected = max(eligible, key=agg.__getitem__) if eligible else None
    return Record(
        problem_id=problem.problem_id, problem=problem.problem, answer=problem.answer,
        level=problem.level, subject=problem.subject, completions=completions,
        step_scores=step_scores, agg_scores=agg, completion_tokens=tokens, finish_reasons=finish,
        selected=selected, pred=extract_answer(completions[selected]) if selected is not None else None,
        approach=recipe.approach, agg_strategy=recipe.agg_strategy,
        groups=groups if groups is not None else list(range(len(completions))),
        tree=tree or [], notes=notes or [], finished=finished,
    )


# --- step-level search (beam search, DVTS)

def step_sampling(recipe, last: bool) -> Sampling:
    """One step (stop at the blank line, kept in the text), or the rest of the solution when `last`."""
    stop = () if last else (STEP_DELIMITER,)
    return Sampling(temperature=recipe.temperature, top_p=recipe.top_p, max_tokens=recipe.max_tokens, stop=stop)


def ended(gen: Generation) -> bool:
    """A step that ends its solution: EOS, out of tokens (a runaway step is not continued), a
    `\\boxed{}` answer, or nothing but whitespace (the model has nothing more to say)."""
    return gen.finish_reason != "stop" or not gen.text.strip() or boxed_answer(gen.text, strict=True) is not None


class StepSearch(Protocol):
    """One problem's step-level search, as `run_steps` drives it: each iteration it asks for candidate
    steps (generate), says what the PRM scores (score) and picks what goes on (select)."""
    problem: Problem

    def expansions(self, it: int) -> list[tuple[str, int]]:
        """(prompt, seed) of every candidate step of iteration `it`; none when this search is over."""

    def rows(self, cands: list[Candidate]) -> list[list[str]]:
        """The completions the PRM scores, in rows (a row's completions are compared with each other)."""

    def select(self, cands: list[Candidate], scores: list[list[list[float]]], it: int) -> None:
        """Take the scores of `rows(cands)` and choose what iteration `it + 1` expands."""


@dataclass
class Candidate:
    step: Generation  # the sampled step
    look: str = ""  # greedy steps rolled out after it (`recipe.lookahead`): scored, never kept


@dataclass
class _Iteration:
    """A problem's candidates of one iteration, as they come back from the stream."""
    search: StepSearch
    it: int
    prompts: list[str]
    seeds: list[int]
    cands: list[Candidate | None]
    looks_left: list[int]
    waiting: int


def run_steps(searches: list[StepSearch], policy: Policy, prm: PRM, recipe) -> None:
    """Run every problem's step-level search to its end, feeding the policy continuously.

    A problem's iteration is scored and selected as soon as all of its candidates are back (steps
    and lookahead), and its next iteration's requests go in while other problems' steps are still
    being generated, so the decode batch stays full (on a stream that can take requests while it
    runs, vLLM's). On a stream that runs in waves every problem moves in lockstep: one generate call
    per iteration (plus one per lookahead step) and one PRM call, for all problems together.
    Records do not depend on which: seeds belong to requests, and a problem's PRM rows are its own."""
    stream = open_stream(policy)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=recipe.max_tokens, stop=(STEP_DELIMITER,))
    order = {id(s): i for i, s in enumerate(searches)}
    owner: dict[int, tuple[_Iteration, int]] = {}  # ticket -> its iteration, candidate
    ready: list[_Iteration] = []

    def launch(s: StepSearch, it: int) -> None:
        todo = s.expansions(it) if it < recipe.num_iterations else []
        if not todo:
            return
        last = it == recipe.num_iterations - 1
        x = _Iteration(s, it, [p for p, _ in todo], [seed for _, seed in todo], [None] * len(todo),
                       [0 if last else recipe.lookahead] * len(todo), len(todo))
        for k, ticket in enumerate(stream.add(x.prompts, step_sampling(recipe, last), x.seeds)):
            owner[ticket] = (x, k)

    def deliver(x: _Iteration, k: int, gen: Generation) -> None:
        if x.cands[k] is None:
            x.cands[k] = Candidate(gen)
            done = ended(gen)
        else:  # a lookahead step
            x.cands[k].look += gen.text
            x.looks_left[k] -= 1
            done = ended(gen)
        if x.looks_left[k] and not done:
            c = x.cands[k]
            (ticket,) = stream.add([x.prompts[k] + c.step.text + c.look], greedy, [x.seeds[k]])
            owner[ticket] = (x, k)
            return
        x.waiting -= 1
        if not x.waiting:
            ready.append(x)

    for s in searches:
        launch(s, 0)
    while owner or ready:
        if ready and (stream.continuous or not stream.busy()):
            batch = sorted(ready, key=lambda x: order[id(x.search)])
            ready.clear()
            rows = [x.search.rows(x.cands) for x in batch]
            scores = prm.score([x.search.problem.problem for x, r in zip(batch, rows) for _ in r],
                               [row for r in rows for row in r])
            at = 0
            for x, r in zip(batch, rows):
                x.search.select(x.cands, scores[at : at + len(r)], x.it)
                at += len(r)
                launch(x.search, x.it + 1)
            continue
        for ticket, gen in stream.collect():
            deliver(*owner.pop(ticket), gen)


def step_node(node: int, parent: int | None, it: int, step: Generation, lookahead: str, own: list[float],
              agg: float, status: str, subtree: int | None = None) -> TreeNode:
    """The tree node of a sampled step: `own` are its path's step scores without the lookahead (so
    `step_score` is the step's own), `agg` what selection compared (lookahead included)."""
    return TreeNode(id=node, parent=parent, iteration=it, step=step.text, lookahead=lookahead, tokens=step.num_tokens,
                    finish=step.finish_reason, step_score=own[-1] if own else None, agg=agg, status=status,
                    subtree=subtree)


def own_scores(scores: list[float], text: str, lookahead: str) -> list[float]:
    """The step scores of `text` alone, from the scores of `text + lookahead`: a PRM scores a step
    from its prefix only, and `text` ends at a step delimiter, so its steps come first."""
    return scores[: len(split_steps(text))] if lookahead else scores
