"""What every strategy shares: per-request seeds, a problem's candidates -> Record, step expansion.

    python -c "from ttc_mlops.search.common import sample_seed; print(sample_seed(42, 'test/1.json', 0, 3))"
"""

from __future__ import annotations

import hashlib

from ..config import STEP_DELIMITER
from ..data import Problem
from ..grading import boxed_answer, extract_answer
from ..policy import Generation, Policy, Sampling
from ..prm import aggregate, split_steps
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


def expand(policy: Policy, prompts: list[str], seeds: list[int], recipe,
           last: bool) -> tuple[list[Generation], list[str]]:
    """One sampled step per prompt (prompt = chat prompt + partial solution), and for each step that
    did not end the solution, `recipe.lookahead` greedy steps rolled out after it. The lookahead text
    is only scored, never kept (search-and-learn's `generate_k_steps`). One generate call, plus one
    per lookahead step, for all prompts together."""
    steps = policy.generate(prompts, step_sampling(recipe, last), seeds)
    looks = [""] * len(prompts)
    live = [] if last else [i for i, g in enumerate(steps) if not ended(g)]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=recipe.max_tokens, stop=(STEP_DELIMITER,))
    for _ in range(recipe.lookahead):
        if not live:
            break
        outs = policy.generate([prompts[i] + steps[i].text + looks[i] for i in live], greedy, [seeds[i] for i in live])
        for i, out in zip(live, outs):
            looks[i] += out.text
        live = [i for i, out in zip(live, outs) if not ended(out)]
    return steps, looks


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
