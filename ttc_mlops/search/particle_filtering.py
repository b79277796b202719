"""Particle filtering and particle Gibbs over steps, guided by a PRM (Puri et al. 2025, arXiv 2502.01618).

    ttc run recipes/SmolLM2-135M-Instruct/particle_filtering.yaml --set n=8 pg_iterations=2

Per problem, n particles (partial solutions) grow one step (up to a blank line) per iteration.
The PRM scores each new step; a particle's log-weight is the logit of that step's score, as in
the paper, and the live particles are resampled with replacement in proportion to
softmax(log-weight / pf_temperature) over the live pool: a strong particle is copied, a weak one
dropped, and each copy samples its own next step (its own seed). A particle that ends (EOS, out of
tokens, a `\\boxed{}` answer) is finished: it keeps its weight and its slot, and is never copied
or dropped again. The last iteration writes every live particle to its end.

Particle Gibbs (`pg_iterations` > 1) runs the filter again, conditioned on
`pg_reference_particles` particles of the sweep before (conditional SMC): they are drawn by weight
from that sweep's final particles, keep their slots and steps unchanged through the new sweep (no
step of theirs is sampled or scored again), and at every iteration stand in the pool the free
particles are resampled from, at the depth the others reached. The budget is n particles x
sweeps, and tokens, PRM tokens and FLOPs count what was actually run.

All problems of a search batch advance together (`run_steps`, one sweep at a time), every
resampling draw is seeded from the recipe's seed, the problem, the sweep and the iteration, so a
record does not depend on the batch, the chunk or a resume. The record keeps the last sweep's n
particles as its completions, in one group (the particles are resampled together, so the run at N
cannot be subsampled to a smaller N), and every sampled step of every sweep as a tree node whose
parent is the particle it continued: the ancestry, with each node's weight and how many particles
were drawn from it. The answer is the finished particle of the highest aggregated score
(`pf_selection: argmax`; with `agg_strategy: last`, the heaviest particle), or one drawn by weight
(`sample`).

What differs from its_hub's `ParticleFiltering` / `ParticleGibbs` (its_hub/algorithms/particle_gibbs.py):
finished particles keep their slot instead of being resampled into copies (so a finished answer is
never duplicated into extra votes), a step that scores exactly 0 can never be drawn, all problems
are batched, and the ancestry is recorded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..data import Problem
from ..policy import Generation, Policy
from ..prm import PRM, aggregate
from ..records import Record, TreeNode
from .common import Candidate, ended, make_record, run_steps, sample_seed, step_node


def resampling_weights(scores: list[float], temperature: float) -> list[float] | None:
    """softmax(logit(score) / temperature): a score of 0 weighs nothing, scores of 1 share all the
    mass; None when every score is 0 (no particle has any weight)."""
    if any(s >= 1.0 for s in scores):
        top = sum(s >= 1.0 for s in scores)
        return [1.0 / top if s >= 1.0 else 0.0 for s in scores]
    logits = [math.log(s / (1.0 - s)) / temperature if s > 0.0 else -math.inf for s in scores]
    if all(x == -math.inf for x in logits):
        return None
    top = max(logits)
    raw = [math.exp(x - top) if x != -math.inf else 0.0 for x in logits]
    total = sum(raw)
    return [x / total for x in raw]


def resample(weights: list[float], k: int, rng: random.Random) -> list[int]:
    """k indices drawn with replacement in proportion to `weights` (multinomial resampling)."""
    return rng.choices(range(len(weights)), weights=weights, k=k)


@dataclass
class _Particle:
    texts: list[str] = field(default_factory=list)  # its steps
    tokens: list[int] = field(default_factory=list)  # completion tokens per step
    nodes: list[int] = field(default_factory=list)  # its steps in the problem's tree
    scores: list[float] = field(default_factory=list)  # per step of `text`, as the PRM last scored it
    newest: list[float] = field(default_factory=list)  # per depth, the score of the step it then ended with
    finish: str = ""
    finished: bool = False
    reference: bool = False  # particle Gibbs: kept from the sweep before, never sampled

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def upto(self, depth: int) -> "_Particle":
        """A free copy of its first `depth` steps."""
        return _Particle(self.texts[:depth], self.tokens[:depth], self.nodes[:depth], newest=self.newest[:depth])


@dataclass
class _Problem:
    problem: Problem
    prompt: str
    tree: list[TreeNode] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Sweep:
    """One problem's filter in one sweep, as `run_steps` drives it."""
    owner: _Problem
    sweep: int
    particles: list[_Particle]  # n slots; in a Gibbs sweep the first are the references
    recipe: object
    live: list[int] = field(default_factory=list)  # the free live slots this iteration extends

    @property
    def problem(self) -> Problem:
        return self.owner.problem

    # generate: one step for every free live particle
    def expansions(self, it: int) -> list[tuple[str, int]]:
        self.live = [j for j, p in enumerate(self.particles) if not (p.finished or p.reference)]
        return [(self.owner.prompt + self.particles[j].text,
                 sample_seed(self.recipe.seed, self.problem.problem_id, self.sweep, it, j)) for j in self.live]

    # score: the new steps in one row
    def rows(self, cands: list[Candidate]) -> list[list[str]]:
        return [[self.particles[j].text + c.step.text for j, c in zip(self.live, cands)]]

    # select: extend, then resample the live particles by weight
    def select(self, cands: list[Candidate], scores: list[list[list[float]]], it: int) -> None:
        last = it == self.recipe.num_iterations - 1
        for j, c, sc in zip(self.live, cands, scores[0]):
            _extend(self.owner, self.particles[j], c.step, sc, it, self.sweep, self.recipe, last)
        _resample_live(self, it)


def particle_filtering(problems: list[Problem], policy: Policy, prm: PRM, recipe) -> list[Record]:
    owners = [_Problem(p, policy.chat_prompt(recipe.system_prompt, p.problem)) for p in problems]
    particles = [[_Particle() for _ in range(recipe.n)] for _ in owners]
    for sweep in range(recipe.pg_iterations):
        if sweep:  # particle Gibbs: the references of the sweep before keep their slots, the rest start afresh
            particles = [_references(o, ps, sweep, recipe) for o, ps in zip(owners, particles)]
        run_steps([_Sweep(o, sweep, ps, recipe) for o, ps in zip(owners, particles)], policy, prm, recipe)
    return [_record(o, ps, recipe) for o, ps in zip(owners, particles)]


def _extend(s: _Problem, p: _Particle, step: Generation, scores: list[float], it: int, sweep: int, recipe,
            last: bool) -> None:
    node = len(s.tree)
    s.tree.append(step_node(node, p.nodes[-1] if p.nodes else None, it, step, "", scores,
                            aggregate(scores, recipe.agg_strategy), "dropped"))
    s.tree[node].sweep = sweep
    p.texts.append(step.text)
    p.tokens.append(step.num_tokens)
    p.nodes.append(node)
    p.scores = list(scores)
    p.newest.append(scores[-1])
    p.finish = step.finish_reason
    if last or ended(step):
        p.finished = True
        s.tree[node].status = "finished"


def _resample_live(w: _Sweep, it: int) -> None:
    """Refill the free live slots by drawing from the live pool (free particles just extended, and
    references still going at this depth) in proportion to their weights."""
    depth = it + 1
    free = [j for j in w.live if not w.particles[j].finished]
    if not free:
        return
    pool = [w.particles[j] for j in free]
    pool += [p for p in w.particles if p.reference and len(p.texts) > depth]  # a reference's state at `depth`
    weights = resampling_weights([p.newest[depth - 1] for p in pool], w.recipe.pf_temperature)
    if weights is None:  # every live particle scored 0: nothing to prefer
        weights = [1.0 / len(pool)] * len(pool)
        w.owner.notes.append(f"sweep {w.sweep} iteration {it + 1}: every live particle scored 0; drawn uniformly")
    rng = random.Random(sample_seed(w.recipe.seed, w.problem.problem_id + "/resample", w.sweep, it))
    drawn = resample(weights, len(free), rng)
    copies = [drawn.count(k) for k in range(len(pool))]
    for k, p in enumerate(pool[: len(free)]):  # the nodes this iteration sampled (references' are a sweep's before)
        node = w.owner.tree[p.nodes[-1]]
        node.weight, node.copies = weights[k], copies[k]
        node.status = "resampled" if copies[k] else "dropped"
    for j, k in zip(free, drawn):
        w.particles[j] = pool[k].upto(depth)


def _references(s: _Problem, particles: list[_Particle], sweep: int, recipe) -> list[_Particle]:
    """The next sweep's slots: pg_reference_particles of these (finished) particles drawn by weight
    without replacement, then free, empty particles."""
    rng = random.Random(sample_seed(recipe.seed, s.problem.problem_id + "/reference", sweep))
    left = list(range(len(particles)))
    chosen = []
    for _ in range(recipe.pg_reference_particles):
        weights = resampling_weights([particles[i].newest[-1] for i in left], recipe.pf_temperature)
        k = resample(weights or [1.0] * len(left), 1, rng)[0]
        chosen.append(left.pop(k))
    s.notes.append(f"sweep {sweep}: reference particles {chosen} of sweep {sweep - 1}")
    refs = [_Particle(p.texts, p.tokens, p.nodes, p.scores, p.newest, p.finish, True, True)
            for p in (particles[i] for i in chosen)]
    return refs + [_Particle() for _ in range(recipe.n - len(refs))]


def _record(s: _Problem, particles: list[_Particle], recipe) -> Record:
    for i, p in enumerate(particles):
        s.tree[p.nodes[-1]].completion = i
    s.notes.insert(0, f"particle_filtering: {recipe.n} particles x {recipe.pg_iterations} sweeps, "
                      f"pf_temperature={recipe.pf_temperature}, pf_selection={recipe.pf_selection}")
    record = make_record(s.problem, recipe, [p.text for p in particles], [p.scores for p in particles],
                         [sum(p.tokens) for p in particles], [p.finish for p in particles],
                         groups=[0] * len(particles), tree=s.tree, notes=s.notes,
                         finished=[p.finished for p in particles])
    if recipe.pf_selection == "sample":
        _select_by_weight(record, particles, recipe)
    return record


def _select_by_weight(record: Record, particles: list[_Particle], recipe) -> None:
    """The answer drawn from the finished particles by weight (seeded per problem)."""
    from ..grading import extract_answer

    finished = [i for i, p in enumerate(particles) if p.finished]
    if not finished:
        return
    weights = resampling_weights([particles[i].newest[-1] for i in finished], recipe.pf_temperature)
    rng = random.Random(sample_seed(recipe.seed, record.problem_id + "/select"))
    record.selected = finished[resample(weights or [1.0] * len(finished), 1, rng)[0]]
    record.pred = extract_answer(record.completions[record.selected])
