#!/usr/bin/bash
set -u
trap '' USR1
pids=()
CUDA_VISIBLE_DEVICES=0,1 python -m sglang.launch_server --model-path /lustre/models/Qwen3-1.7B --host 0.0.0.0 --port 30000 --tp-size 2 --mem-fraction-static 0.7 --dtype bfloat16 --random-seed 0 --skip-tokenizer-init --api-key "$OPD_SERVER_KEY" & pids+=($!)
CUDA_VISIBLE_DEVICES=2,3 python -m sglang.launch_server --model-path /lustre/models/Qwen3-1.7B --host 0.0.0.0 --port 30001 --tp-size 2 --mem-fraction-static 0.7 --dtype bfloat16 --random-seed 0 --skip-tokenizer-init --api-key "$OPD_SERVER_KEY" & pids+=($!)
CUDA_VISIBLE_DEVICES=4,5 python -m sglang.launch_server --model-path /lustre/models/Qwen3-1.7B --host 0.0.0.0 --port 30002 --tp-size 2 --mem-fraction-static 0.7 --dtype bfloat16 --random-seed 0 --skip-tokenizer-init --api-key "$OPD_SERVER_KEY" & pids+=($!)
CUDA_VISIBLE_DEVICES=6,7 python -m sglang.launch_server --model-path /lustre/models/Qwen3-1.7B --host 0.0.0.0 --port 30003 --tp-size 2 --mem-fraction-static 0.7 --dtype bfloat16 --random-seed 0 --skip-tokenizer-init --api-key "$OPD_SERVER_KEY" & pids+=($!)
wait -n "${pids[@]}"; echo "an SGLang server exited; stopping this node" >&2; kill "${pids[@]}" 2>/dev/null; exit 1
