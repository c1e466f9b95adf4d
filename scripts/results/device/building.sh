# `seka fit` on 1 and on 2 GPUs (DDP, ddp_frozen) with the Qwen3-8B shape. Carry a .dev/cN folder holding the
# jsonargparse, docstring_parser, typeshed_client and transformers wheels (the CLI needs jsonargparse).
source scripts/results/device/env.sh
[ -d /tmp/site/jsonargparse ] || install_wheels "$S"/jsonargparse-*.whl "$S"/docstring_parser-*.whl \
    "$S"/typeshed_client-*.whl "$S"/transformers-*.whl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
timeout 560 python3 -m seka_lightning.bench building --shape qwen3-8b --out $OUT/building --ddp-devices 1 2 2>&1 | tee $OUT/building.log
