# static_loop generation for none / seka / adaseka at batch 1 and 10, one H200, after SEKA's key edit moved to one
# bf16 tensor-core matmul on split gains (G_hi; G_lo) per head instead of a float32 matmul. Carry .dev/c7.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
timeout 400 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 10 \
    --new-tokens 60 --prompt-tokens 4096 --methods none seka adaseka --fast-methods none seka adaseka \
    --paths static_loop --fast-repeats 5 --fast-warmup 2 --out $OUT/loop 2>&1 | grep -v -i warn > $OUT/loop.log
tail -12 $OUT/loop.log
