"""The MLflow wing: the only package that imports mlflow. The core (config, data, records, grading,
voting, search, policy, prm) computes; this package runs it as MLflow runs and reads them back.

    ttc run recipes/SmolLM2-135M-Instruct/best_of_n.yaml --set num_samples=4

- `store`: the tracking store: parent and chunk runs, logging, records read back;
- `run_chunk`: one chunk of a recipe as a child run: preflight, search loop, checkpoint;
- `merge`, `evaluate`: the parent's side: coverage-checked records, accuracy at every n;
- `model`: the registered model (a version per evaluated configuration) and its pyfunc;
- `compare`, `launch`: curves across an experiment's parents; Slurm array jobs.
"""
