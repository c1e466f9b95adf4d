# Generation speed on one otherwise idle H200: plain generate for none / seka / adaseka, then the static-cache +
# compiled fast path for none / seka (batch 1 and 10, ~4k-token prompts, 60 new tokens, bf16, SDPA).
source scripts/results/device/env.sh
install_wheels "$S"/jsonargparse-*.whl "$S"/docstring_parser-*.whl "$S"/typeshed_client-*.whl "$S"/transformers-*.whl "$S"/gguf-*.whl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
CUDA_VISIBLE_DEVICES=0 timeout 560 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 10 \
    --new-tokens 60 --prompt-tokens 4096 --repeats 5 --methods none seka adaseka --paths eager static_compile \
    --fast-methods none seka --out $OUT/generation 2>&1 | tee $OUT/generation.log
