# `seka fit` on 1 and on 2 GPUs (DDP, ddp_frozen) with the Qwen3-8B shape.
source scripts/results/device/env.sh
timeout 560 python3 -m seka_lightning.bench building --shape qwen3-8b --out $OUT/building --ddp-devices 1 2 2>&1 | tee $OUT/building.log
