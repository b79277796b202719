"""Names shared by whoever writes or reads a run: tags, metrics, artifacts, run and model names.

    python -c "from ttc_mlops import names; print(names.TAG_ROLE, names.chunk_artifact(0, 50))"

Plain constants and string functions, no mlflow import: the voting code, the plots and the tests
name a metric without loading the tracking client. `ttc_mlops.pipeline` is what talks to MLflow.

Layout. One experiment per benchmark. A *parent* run per search configuration (the recipe minus
its chunk fields, hashed into the tag `ttc.search_key`); one *chunk* child run per slice of the
problems, linked by `mlflow.parentRunId`. Chunk runs hold their records under `records/`; merge
writes `records/merged.jsonl.gz` on the parent, evaluate logs the accuracy metrics there.
"""

from __future__ import annotations

import re

# --- tags
TAG_ROLE = "ttc.role"  # ROLE_PARENT | ROLE_CHUNK | ROLE_STEP | ROLE_COMPARE | ROLE_LAUNCHER | ROLE_FAILED
TAG_SEARCH_KEY = "ttc.search_key"
TAG_STRATEGY = "ttc.strategy"
TAG_MODEL = "ttc.model"
TAG_PRM = "ttc.prm"
TAG_DATASET = "ttc.dataset"
TAG_N = "ttc.n"
TAG_ROWS = "ttc.rows"  # "start:end", the chunk's rows of the problem set (its identity)
TAG_PROBLEMS = "ttc.problems"  # problems in the chunk
TAG_TOTAL = "ttc.total_problems"  # problems in the whole set
TAG_MERGED = "ttc.merged"  # MERGED_COMPLETE | MERGED_PARTIAL
TAG_MERGED_PROBLEMS = "ttc.merged_problems"  # problems in the merged records
TAG_MERGED_DIGEST = "ttc.merged_digest"  # sha256 of the merged records (what evaluate graded)
TAG_PROBLEM_SET = "ttc.problem_set"  # sha256 of the merged records' problem ids: which problems were graded
TAG_EVALUATED = "ttc.evaluated"  # the merged digest that evaluate's metrics belong to
TAG_GROUP = "ttc.group"  # "<model>/<strategy>": group-by key for the mlflow ui chart view
TAG_REGISTERED = "ttc.registered"  # "<registered model>/<version>"
TAG_ERROR = "ttc.error"  # why a run failed before any work
TAG_POINTS_TO = "ttc.points_to"  # a launcher run's parent run (in the recipe's experiment)
TAG_STOPPED_BY = "ttc.stopped_by"  # the signal that stopped a chunk (SIGTERM, SIGHUP, SIGINT)
# a chunk run's lease (pipeline/lease.py): who works it, since when, last renewed (unix s; 0: released)
TAG_LEASE_HOST, TAG_LEASE_PID, TAG_LEASE_TASK = "ttc.lease.host", "ttc.lease.pid", "ttc.lease.slurm_task"
TAG_LEASE_STARTED, TAG_LEASE_RENEWED = "ttc.lease.started", "ttc.lease.renewed"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_NOTE = "mlflow.note.content"  # the run's description in the UI
# the experiment's kind, as MLflow 3's UI reads it: "custom_model_development" opens the classic
# "Machine learning" view (runs table, charts of accuracy against n) instead of the GenAI one
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_TRACED = "ttc.traced"  # "<merged digest>:<trace_problems>": what the parent's traces were written from

# --- problem sets as MLflow datasets (the run's Datasets panel): name = dataset_name, digest =
# problem_set_digest of the problem ids the run holds, input context DATASET_CONTEXT
DATASET_CONTEXT = "eval"
INPUT_TAG_PROBLEMS = "ttc.problems"  # problems in the logged set
INPUT_TAG_RECORDS = "ttc.records"  # a parent's: the merged records digest that set came with

# --- traces (one per sampled problem, on the parent; pipeline/traces.py): trace tags the UI searches
TRACE_TAG_PROBLEM = "ttc.problem_id"
TRACE_TAG_CORRECT = "ttc.correct"  # true | false | undecided | ungraded
TRACE_TAG_LEVEL = "ttc.level"
TRACE_TAG_STRATEGY = "ttc.strategy"
TRACE_TAG_N = "ttc.n"
TRACE_TAG_RECORDS = "ttc.records"  # the merged records digest the trace was written from

ROLE_PARENT = "parent"  # one per search configuration
ROLE_CHUNK = "chunk"  # one per slice of the problems, under its parent
ROLE_STEP = "step"  # the run `mlflow run -e merge|evaluate` starts, nested under the parent
ROLE_COMPARE = "compare"  # a run that holds a comparison figure of an experiment
ROLE_LAUNCHER = "launcher"  # the run `mlflow run` started in another experiment: points to the parent
ROLE_FAILED = "failed"  # the run `mlflow run` started, for a recipe that failed its checks
MERGED_COMPLETE = "complete"
MERGED_PARTIAL = "partial"

# --- artifacts
RECORDS_DIR = "records"
MERGED_RECORDS = "merged.jsonl.gz"
MERGE_REPORT = f"{RECORDS_DIR}/merge-report.txt"  # missing / duplicate problems of a partial merge
RECIPE_ARTIFACT = "recipe.yaml"
EVAL_TABLE = "eval/accuracy.json"
EVAL_PLOT = "eval/accuracy.png"
EVAL_PROBLEMS = "eval/problems.json"  # one row per problem: gold, selected answer, verdict, score, tokens
EVAL_DIR = "eval"  # also eval/search-*.html: every problem's completions and search tree
COMPARE_TABLE = "compare/accuracy.json"
COMPARE_PLOT = "compare/accuracy.png"
MODEL_ARTIFACT = "model"
BEST_ALIAS = "best"

# --- metrics of a chunk run
M_PROBLEMS = "problems"
M_COMPLETION_TOKENS = "completion_tokens"  # tokens of the kept completions
M_TOKENS_PER_S = "tokens_per_s"
M_WALL_S = "wall_s"
M_ACC_SELECTED = "acc_selected"
M_UNGRADED = "ungraded"  # problems whose gold answer could not be parsed
M_GENERATE_CALLS = "generate_calls"
M_GENERATED_TOKENS = "generated_tokens"  # everything sampled: pruned beams and lookahead too
M_GEN_S = "gen_s"
M_PRM_S = "prm_s"
M_OTHER_S = "other_s"
M_PRM_TOKENS = "prm_tokens"  # tokens the PRM ran (reused prefixes do not count)
# compute: about 2 x parameters x tokens, as run and as it would be without prefix reuse ("_full")
M_PROMPT_TOKENS = "prompt_tokens"  # prompt / prefill tokens the policy ran
M_PROMPT_TOKENS_FULL = "prompt_tokens_full"  # every prompt token of every request, reuse or not
M_PRM_TOKENS_FULL = "prm_tokens_full"  # every token of every sequence the PRM scored
M_POLICY_PARAMS = "policy_params"
M_PRM_PARAMS = "prm_params"
M_POLICY_FLOPS = "policy_flops"  # 2 x policy_params x (prompt_tokens + generated_tokens)
M_POLICY_FLOPS_FULL = "policy_flops_full"  # 2 x policy_params x (prompt_tokens_full + generated_tokens)
M_PRM_FLOPS = "prm_flops"  # 2 x prm_params x prm_tokens
M_PRM_FLOPS_FULL = "prm_flops_full"  # 2 x prm_params x prm_tokens_full
M_FLOPS = "flops"  # policy_flops + prm_flops

# --- evaluate's metrics, logged on the parent with step = n
M_ACC_NAIVE = "acc_naive"  # the completion with the highest aggregated score
M_ACC_WEIGHTED = "acc_weighted"  # equivalent answers pooled, aggregated scores summed
M_ACC_MAJ = "acc_maj"  # the most frequent answer
M_PASS = "pass"  # any of the n completions is correct (pass@n)
VOTING_METRICS = (M_ACC_NAIVE, M_ACC_WEIGHTED, M_ACC_MAJ, M_PASS)
M_EVAL_PROBLEMS = "eval_problems"  # problems with a gold answer, at step = n
M_UNDECIDED = "grading_undecided"  # answer classes the grader could not decide (counted wrong)


def level_metric(metric: str, level: int) -> str:
    return f"{metric}_level_{level}"


def chunk_artifact(start: int, end: int) -> str:
    return f"chunk-{start:05d}-{end:05d}.jsonl.gz"


def chunk_counters_artifact(records_artifact: str) -> str:
    """What a chunk's work cost so far (calls, tokens, seconds), checkpointed with its records."""
    return records_artifact.replace(".jsonl.gz", ".counters.json")


def experiment_name(recipe) -> str:
    return recipe.experiment_name or f"ttc-{recipe.dataset_label}"


def run_name(recipe) -> str:
    from .strategies import STRATEGIES

    return f"{recipe.model_label}-{recipe.approach}-n{recipe.n}" + STRATEGIES[recipe.approach].suffix(recipe)


def chunk_run_name(start: int, end: int) -> str:
    return f"rows-{start:05d}-{end:05d}"


def model_label_of(model_path: str) -> str:
    return model_path.rstrip("/").split("/")[-1].split(":")[-1]


def registered_model_name(recipe) -> str:
    """One registered model per (policy model, strategy)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"ttc-{recipe.model_label}-{recipe.approach}")


# --- compute-optimal scaling (`ttc optimal`, the compute_optimal strategy)
M_FLOPS_PER_PROBLEM = "flops_per_problem"  # evaluate, step = n: the chunks' `flops` per problem, scaled to n
EVAL_DIFFICULTY = "eval/difficulty.json"  # best-of-N parent: per problem pass@1, mean PRM score, their bins
EVAL_OUTCOMES = "eval/outcomes.json"  # per voting rule, per n, per problem: 1 where the rule picked a right answer
ROLE_OPTIMAL = "optimal"  # a `ttc optimal` run: the compute-optimal curve and the table to deploy
TAG_DIFFICULTY = "ttc.difficulty"  # oracle | model
TAG_BUDGET_AXIS = "ttc.budget_axis"  # n | flops
TAG_RULE = "ttc.rule"  # the voting rule accuracy was measured with (acc_weighted, ...)
OPTIMAL_TABLE = "optimal/table.json"  # per budget, bin -> (strategy, settings): what compute_optimal applies
OPTIMAL_CURVE = "optimal/curve.json"  # per budget: compute-optimal (cross-validated, in-sample), every fixed strategy
OPTIMAL_ROUTES = "optimal/routes.json"  # per (budget, bin): the chosen configuration, flat, for the UI's table view
OPTIMAL_PLOT = "optimal/accuracy.png"
M_OPTIMAL_IN_SAMPLE = "optimal_in_sample"  # a `ttc optimal` run, step = budget: chosen and scored on the same problems


# MLflow 3.17's UI opens an experiment in its GenAI view unless the address asks for the "Model
# training" one (the experiment kind tag alone does not switch it; docs/mlflow.md)
UI_VIEW = "?workflowType=machine_learning"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The UI page of a run, in the view where its metrics and charts are."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}"
