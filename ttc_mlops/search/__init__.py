"""Search strategies: each a function (problems, policy, prm, recipe) -> one Record per problem.

    python -c "from ttc_mlops.search import STRATEGIES; print(sorted(STRATEGIES))"
"""

from __future__ import annotations

from .beam_search import beam_search
from .best_of_n import best_of_n
from .compute_optimal import compute_optimal
from .dvts import dvts

STRATEGIES = {
    "best_of_n": best_of_n,
    "beam_search": beam_search,
    "dvts": dvts,
    "compute_optimal": compute_optimal,  # routes each problem to one of the above (a `ttc optimal` table)
}
