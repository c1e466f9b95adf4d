# Batch-1 generation on one H200: plain generate (eager) and StaticGreedyDecoder (static_loop: static cache, compiled
# decode step replayed as a CUDA graph), none and seka, against the hardware floor.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
CUDA_VISIBLE_DEVICES=0 timeout 270 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 \
    --new-tokens 60 --prompt-tokens 4096 --methods none seka --fast-methods none seka --paths eager static_loop \
    --repeats 7 --warmup 1 --fast-repeats 5 --fast-warmup 2 --out $OUT/loop 2>&1 | grep -v -i warn | tee $OUT/loop.log
