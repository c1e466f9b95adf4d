# Batch-10 generation through StaticGreedyDecoder (static_loop) for none / seka / adaseka (4 experts), one H200.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 10 \
    --new-tokens 60 --prompt-tokens 4096 --methods none seka adaseka --fast-methods none seka adaseka \
    --paths static_loop --fast-repeats 5 --fast-warmup 2 --out $OUT/loop 2>&1 | grep -v -i warn | tee $OUT/loop.log
