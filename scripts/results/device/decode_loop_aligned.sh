# Commit 0570a1a (cache length rounded up to a multiple of 64), one H200. Carry .dev/c7. Run as two device calls on
# the same warm machine: the decode-step profile (first compile), then batch-1 static_loop for none / seka.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
timeout 150 python3 scripts/results/decode_profile.py --out $OUT/profile 2>&1 | grep -v -i warn | tail -32
timeout 95 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 --new-tokens 60 \
    --prompt-tokens 4096 --methods none seka --fast-methods none seka --paths static_loop --fast-repeats 3 \
    --fast-warmup 1 --out $OUT/loop 2>&1 | grep -v -i warn | tail -6
