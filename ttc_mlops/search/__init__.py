"""Search strategies: each a function (problems, policy, prm, recipe) -> one Record per problem, one file each.

    python -c "from ttc_mlops.strategies import STRATEGIES; print(sorted(STRATEGIES))"

Which strategies exist, the recipe fields each reads and how its budget counts are declared once,
in `ttc_mlops.strategies`; everything else reads that table.
"""
