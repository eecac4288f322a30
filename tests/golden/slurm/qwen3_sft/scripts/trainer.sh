#!/usr/bin/bash
set -euo pipefail
cd /lustre/code/megatron-opd
python -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$OPD_TRAINER_HEAD:29500 --rdzv-id=$SLURM_JOB_ID -m megatron_opd.cli run recipes/qwen3/sft.yaml  
