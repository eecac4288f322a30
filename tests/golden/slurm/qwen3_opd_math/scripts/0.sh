#!/usr/bin/bash
set -euo pipefail
cd /lustre/code/megatron-opd
python -m megatron_opd.cli wait-servers --timeout 1800 --api-key-env OPD_SERVER_KEY "$OPD_ROLLOUT_URLS" "$OPD_TEACHER_MATH_URLS"
trap '' USR1
rm -f /lustre/runs/qwen3-1.7b-opd-math/stopped.json
rc=0; python -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$OPD_TRAINER_HEAD:29500 --rdzv-id=$SLURM_JOB_ID -m megatron_opd.cli run recipes/qwen3/opd_math.yaml "rollout.urls=[$OPD_ROLLOUT_URLS]" "rollout.api_key_env=OPD_SERVER_KEY" "teachers.teachers.math.urls=[$OPD_TEACHER_MATH_URLS]" "teachers.teachers.math.api_key_env=OPD_SERVER_KEY" || rc=$?
if [ "$rc" = 75 ] || [ -f /lustre/runs/qwen3-1.7b-opd-math/stopped.json ]; then
  echo "[opd] stopped on a signal with a checkpoint: requeueing job $SLURM_JOB_ID to resume" >&2
  scontrol requeue "$SLURM_JOB_ID"; exit 0
fi
exit "$rc"
