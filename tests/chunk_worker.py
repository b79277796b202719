"""A chunk process for the fault tests: `run_chunk` with scripted models (no weights) that take
`delay` seconds per generate call, against MLFLOW_TRACKING_URI; exits as `ttc run` does.

    MLFLOW_TRACKING_URI=sqlite:///s.db python tests/chunk_worker.py EXPERIMENT CHUNK NUM_CHUNKS DELAY
"""

import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakePolicy, FakePRM  # noqa: E402

from ttc_mlops.config import BUILTIN_DATASET, EMBEDDED_MODEL, Recipe  # noqa: E402
from ttc_mlops.data import builtin_problems  # noqa: E402
from ttc_mlops.pipeline.lease import ChunkBusy  # noqa: E402
from ttc_mlops.pipeline.run_chunk import Stopped, run_chunk  # noqa: E402

PROBLEMS = builtin_problems()[:8]
SCRIPT = {p.problem: [f"Work.[s=0.6]\n\nSo \\boxed{{{p.answer}}}[s=0.9]", "So \\boxed{0}[s=0.1]"] for p in PROBLEMS}


class SlowPolicy(FakePolicy):
    def __init__(self, delay):
        super().__init__(SCRIPT)
        self.delay = delay

    def generate(self, prompts, sampling, seeds):
        time.sleep(self.delay)
        return super().generate(prompts, sampling, seeds)


def recipe(experiment: str, chunk: int, num_chunks: int) -> Recipe:
    return Recipe(model_path=EMBEDDED_MODEL, prm_path=EMBEDDED_MODEL, dataset_name=BUILTIN_DATASET, num_samples=8,
                  n=2, search_batch_size=2, experiment_name=experiment, chunk=chunk, num_chunks=num_chunks)


if __name__ == "__main__":
    experiment, chunk, num_chunks, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    try:
        result = run_chunk(recipe(experiment, chunk, num_chunks), SlowPolicy(delay), FakePRM(), progress=False)
    except ChunkBusy as err:
        print(f"busy: {err}", file=sys.stderr)
        sys.exit(1)
    except Stopped as err:
        print(f"{err}", file=sys.stderr)
        sys.exit(128 + getattr(signal, err.signal))
    print(f"done {result.run_id} {len(result.records)} resumed_from={result.resumed_from}")
