# Batch-1 static_loop generation for none / seka with packed_gqa_sdpa, one H200. It measured commit d080cb2, which was
# reverted (0d31372) because it was slower; check that commit out to repeat it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
timeout 200 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 \
    --new-tokens 60 --prompt-tokens 4096 --methods none seka --fast-methods none seka \
    --paths static_loop --fast-repeats 3 --fast-warmup 2 --out $OUT/loop 2>&1 | grep -v -i warn | tail -8
