# Cluster specifics, in one place: edit this file (or a copy that TTC_CLUSTER or `ttc launch
# --cluster-file` points at) and nothing else. `ttc launch` reads the two sbatch option arrays;
# both job scripts call ttc_env before they run `ttc`.
#
#     ttc launch recipes/Llama-3.2-1B-Instruct/best_of_n.yaml --chunks 8
#
# Options given to `ttc launch --sbatch-arg` / `--merge-sbatch-arg` come after these and win.

# Every chunk task: one policy and one PRM search over a slice of the problems.
CHUNK_SBATCH=(
    --cpus-per-task=1
    --time=1-00:00:00
    # --partition=gpu
    # --gres=gpu:1
    # --mem=64G
    # --account=my-project
)

# The merge + evaluate job: reads the chunks' records and grades them; needs no GPU.
MERGE_SBATCH=(
    --cpus-per-task=1
    --time=02:00:00
    # --partition=cpu
    # --account=my-project
)

# The PRM server of `ttc launch --serve-prm` (one `vllm serve --runner pooling` for every task of the
# sweep); without this array it gets the chunk tasks' options.
SERVE_SBATCH=(
    --cpus-per-task=1
    --time=1-00:00:00
    # --partition=gpu
    # --gres=gpu:1
)

# Runs on the node at the start of every job, before `ttc`: make `ttc` runnable there. A job
# starts with the submitting shell's environment (sbatch's default --export=ALL), so an activated
# virtualenv already carries over; clusters that purge it need the lines below.
ttc_env() {
    # module load cuda/12.4
    # source ~/miniforge3/etc/profile.d/conda.sh && conda activate ttc
    # source ~/venvs/ttc/bin/activate
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}  # torch's CPU threads = the CPUs Slurm granted
}

# Runs on the PRM server's node before `vllm serve` (--serve-prm): vLLM must import there with the
# interpreter `ttc launch` ran under. TTC_SERVE_HOST: the name other nodes reach it by (default: hostname).
ttc_serve_env() {
    ttc_env
    # export TTC_SERVE_HOST=$(hostname -f)
}
