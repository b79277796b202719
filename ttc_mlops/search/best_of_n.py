"""Best-of-N: sample N full solutions per problem, score every step, keep the best.

    ttc run recipes/SmolLM2-135M-Instruct/best_of_n.yaml --set n=8
"""

from __future__ import annotations

from ..data import Problem
from ..policy import Policy, Sampling
from ..prm import PRM
from ..records import Record
from .common import make_record, sample_seed


def best_of_n(problems: list[Problem], policy: Policy, prm: PRM, recipe) -> list[Record]:
    n = recipe.n
    sampling = Sampling(temperature=recipe.temperature, top_p=recipe.top_p, max_tokens=recipe.max_tokens)

    # generate: N samples of every problem in one batched call
    prompts = [policy.chat_prompt(recipe.system_prompt, p.problem) for p in problems]
    gens = policy.generate([prompt for prompt in prompts for _ in range(n)], sampling,
                           [sample_seed(recipe.seed, p.problem_id, i) for p in problems for i in range(n)])
    per_problem = [gens[k * n : (k + 1) * n] for k in range(len(problems))]

    # score: every step of every completion
    scores = prm.score([p.problem for p in problems], [[g.text for g in gs] for gs in per_problem])

    # select: the highest aggregated score (make_record)
    return [
        make_record(p, recipe, [g.text for g in gs], s, [g.num_tokens for g in gs], [g.finish_reason for g in gs])
        for p, gs, s in zip(problems, per_problem, scores)
    ]
