#!/bin/bash
# Tandem: GRPO on Llama-3-70B over 4 nodes of 8 × 80 GB GPUs (TP 8 × PP 4; vLLM TP 8).
#
#   MODEL_PATH=/path/to/Llama-3-70B-Instruct sbatch slurm/ppo_70b.sh [hydra overrides...]
#   sbatch slurm/ppo_70b.sh actor.optim.lr=5e-7          # overrides win over the defaults below
#   sbatch --nodes=8 slurm/ppo_70b.sh                    # DP 2; the planner re-checks the layout
#   slurm/ppo_70b.sh --plan [overrides...]               # the memory plan only, no allocation
#
# Submit from the repository root (the job runs there). Environment it reads:
#   MODEL_PATH   HF directory of the model (else pass model.path=...)
#   PYTHON       interpreter with Tandem installed (default: python3)
#   RUN_ROOT     where run directories go (default: ./runs); the run directory is
#                $RUN_ROOT/ppo_70b-$SLURM_JOB_ID: a requeued job keeps its id, so it finds its
#                checkpoints there and the trainer resumes from the latest complete one.
#   MASTER_PORT  rendezvous port (default: derived from the job id)
#
# The job fails within minutes, not an hour in: the planner (python -m trainer.plan) checks
# every divisibility rule and the per-GPU memory of each phase for this job's world size before
# any rank starts, and srun kills the whole step as soon as one rank exits with an error.
#
#SBATCH --job-name=tandem-ppo-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
# B: signals the batch shell only (the ranks would die of USR1's default action): 120 s before
# the time limit it requeues the job, which resumes from its latest checkpoint.
#SBATCH --signal=B:USR1@120

set -euo pipefail

# ---- the run's settings: the caller's overrides come after these, and hydra's last wins ------
DEFAULTS=(
  model=llama3_70b parallel=llama3_70b rollout=llama3_70b algorithm=grpo
  data.max_prompt_length=1024 data.train_batch_size=64 rollout.n=8
  actor.ppo_mini_batch_size=16 actor.micro_batch_size=1 actor.optim.lr=1e-6
  actor.offload_optimizer=true
  actor.optim.lr_warmup_steps=10 trainer.total_steps=500 trainer.save_freq=10
  trainer.test_freq=20 logger.experiment=ppo_70b
)
if [[ -n "${MODEL_PATH:-}" ]]; then
  DEFAULTS+=("model.path=${MODEL_PATH}")
fi
PYTHON="${PYTHON:-python3}"
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "${SLURM_SUBMIT_DIR:-.}"

if [[ "${1:-}" == "--plan" ]]; then  # outside slurm: the world size this header asks for
  shift
  nodes=$(sed -n 's/^#SBATCH --nodes=//p' "${SELF}")
  per_node=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "${SELF}")
  exec "${PYTHON}" -m trainer.plan --world-size "${SLURM_NTASKS:-$((nodes * per_node))}" \
    "${DEFAULTS[@]}" "$@"
fi
: "${SLURM_JOB_ID:?submit with sbatch (or run with --plan for the memory plan alone)}"

RUN_DIR="${RUN_ROOT:-runs}/ppo_70b-${SLURM_JOB_ID}"
RUN_DIR="$(mkdir -p "${RUN_DIR}/logs" && cd "${RUN_DIR}" && pwd)"
ATTEMPT="${SLURM_RESTART_COUNT:-0}"
ARGS=("${DEFAULTS[@]}" "trainer.output_dir=${RUN_DIR}" "$@")

# ---- rendezvous: rank 0 lives on the job's first node -----------------------------------------
mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
if [[ "${#HOSTS[@]}" -ne "${SLURM_NNODES}" ]]; then
  echo "scontrol listed ${#HOSTS[@]} hosts for ${SLURM_NNODES} nodes: ${HOSTS[*]}" >&2
  exit 1
fi
export MASTER_ADDR="${HOSTS[0]}"
# One port per job id: a requeued job gets the same one, two jobs on a node differ.
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# ---- NCCL and process environment --------------------------------------------------------------
# NVLink SHARP multicast off: its buffers take GPU memory the colocated engine needs.
export NCCL_NVLS_ENABLE=0
# A failed or timed-out collective aborts the rank (and srun the step) instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Long InfiniBand retry timeout: rides out brief fabric hiccups in a day-long job.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Warnings only; NCCL_DEBUG=INFO shows the chosen transport when a run is slow.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Free the tensors of finished collectives at once rather than at stream sync: lower peaks.
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
# megatron orders its TP communication behind compute on one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# vLLM runs inside each trainer rank (SPMD, external launcher), not in a child process.
export VLLM_ENABLE_V1_MULTIPROCESSING=0
# Not set on purpose: PYTORCH_CUDA_ALLOC_CONF=expandable_segments (vLLM's sleep mode refuses it).
# Cluster specific, set them here if NCCL picks the wrong interfaces: NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export TOKENIZERS_PARALLELISM=false

echo "job ${SLURM_JOB_ID} attempt ${ATTEMPT}: ${SLURM_NNODES} nodes, ${SLURM_NTASKS} ranks," \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run directory ${RUN_DIR}"

# ---- fail early: layout and memory, on this node, before any rank starts ------------------------
PLAN="${RUN_DIR}/logs/plan.${ATTEMPT}.txt"
if ! "${PYTHON}" -m trainer.plan --world-size "${SLURM_NTASKS}" "${ARGS[@]}" >"${PLAN}" 2>&1; then
  cat "${PLAN}" >&2
  echo "the planner refused this layout (above); nothing was started" >&2
  exit 1
fi
cat "${PLAN}"

# ---- requeue near the time limit ----------------------------------------------------------------
# shellcheck disable=SC2317  # reached through the trap, which shellcheck 0.9 does not follow
requeue() {
  echo "USR1: the time limit is near; requeueing job ${SLURM_JOB_ID} (it resumes from the" \
    "latest checkpoint in ${RUN_DIR})"
  scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR1

# ---- the ranks: one per GPU ----------------------------------------------------------------------
# Every task sees all GPUs of its node and picks its own from SLURM_LOCALID (init_distributed).
LOG="${RUN_DIR}/logs/train.${ATTEMPT}.log"
echo "training log: ${LOG}"
srun --kill-on-bad-exit=1 --label --cpu-bind=none --output="${LOG}" \
  "${PYTHON}" -m trainer.main "${ARGS[@]}" &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; wait again until srun itself is done.
while true; do
  status=0
  wait "${SRUN_PID}" || status=$?
  kill -0 "${SRUN_PID}" 2>/dev/null || break
done
echo "srun exited with status ${status}"
exit "${status}"
