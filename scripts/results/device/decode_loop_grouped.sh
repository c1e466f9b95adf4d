# Grouped decode attention (gqa_decode_attention) and the causal prompt pass, one H200. Carry .dev/c7.
# 1. its accuracy at the Qwen3-8B attention shape (scripts/results/decode_attention_check.py);
# 2. the decode-step kernel profile (scripts/results/decode_profile.py); stops here if the step does not compile;
# 3. static_loop generation for none / seka / adaseka at batch 1, then 10 (details kept per block if cut short).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
set -o pipefail
timeout 60 python3 scripts/results/decode_attention_check.py --out $OUT/check 2>&1 | grep -v -i warn | tail -4
timeout 150 python3 scripts/results/decode_profile.py --out $OUT/profile 2>&1 | grep -v -i warn > $OUT/profile.log \
    || { tail -60 $OUT/profile.log; exit 1; }
tail -24 $OUT/profile.log
timeout 370 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 10 \
    --new-tokens 60 --prompt-tokens 4096 --methods none seka adaseka --fast-methods none seka adaseka \
    --paths static_loop --fast-repeats 5 --fast-warmup 2 --out $OUT/loop 2>&1 | grep -v -i warn > $OUT/loop.log
tail -14 $OUT/loop.log
