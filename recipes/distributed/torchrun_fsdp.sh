#!/bin/bash
# The torchrun equivalent of slurm_fsdp.sbatch: run this same script on every node (any scheduler, or by
# hand). torchrun starts one process per GPU and Lightning reads torchrun's environment.
#
#   NODES=2 NODE_RANK=0 MASTER=node0:29500 bash recipes/distributed/torchrun_fsdp.sh    # on node 0
#   NODES=2 NODE_RANK=1 MASTER=node0:29500 bash recipes/distributed/torchrun_fsdp.sh    # on node 1
#   bash recipes/distributed/torchrun_fsdp.sh                                           # one node, all GPUs
#
# Knobs as in slurm_fsdp.sbatch: RECIPE, RUN_DIR, TP, CP, TIMEOUT_S, GPUS, MMGROW_DRY_RUN=1.
set -euo pipefail

RECIPE=${RECIPE:-recipes/distributed/fsdp_cpu.yaml}
RUN_DIR=${RUN_DIR:-runs/torchrun}
NODES=${NODES:-1}
GPUS=${GPUS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

args=(fit --config "$RECIPE" --trainer.accelerator gpu --trainer.num_nodes "$NODES" --trainer.devices "$GPUS"
      --trainer.strategy.init_args.collective_timeout_s "${TIMEOUT_S:-600}"
      --trainer.default_root_dir "$RUN_DIR")
# the recipe's layout unless asked (MeshParallelStrategy has both; ContextParallelStrategy only context_parallel)
if [ -n "${TP:-}" ]; then args+=(--trainer.strategy.init_args.tensor_parallel "$TP"); fi
if [ -n "${CP:-}" ]; then args+=(--trainer.strategy.init_args.context_parallel "$CP"); fi
if [ -e "$RUN_DIR/checkpoints/last.ckpt" ]; then
  args+=(--ckpt_path "$RUN_DIR/checkpoints/last.ckpt")
fi
args+=("$@")
launch=(torchrun --nnodes "$NODES" --nproc_per_node "$GPUS" --node_rank "${NODE_RANK:-0}"
        --rdzv_backend c10d --rdzv_endpoint "${MASTER:-localhost:29500}" -m mmgrow "${args[@]}")

if [ "${MMGROW_DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${launch[@]}"; echo
  exit 0
fi
exec "${launch[@]}"
