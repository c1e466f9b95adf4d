# Rejected variant: FlexAttention decode steps (prepared decode mask) and the causal prompt pass, one H200. It measured
# docs/performance/rejected/flex-decode.diff applied to commit 1c68570 (git apply); carry .dev/c7. First the
# decode-step kernel profile (scripts/results/decode_profile.py; stops here if the step does not compile), then
# batch-1 static_loop generation for none / seka / adaseka.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
set -o pipefail
timeout 240 python3 scripts/results/decode_profile.py --out $OUT/profile 2>&1 | grep -v -i warn > $OUT/profile.log \
    || { tail -60 $OUT/profile.log; exit 1; }
tail -30 $OUT/profile.log
timeout 300 python3 -m seka_lightning.bench generation --shape qwen3-8b --batch-sizes 1 \
    --new-tokens 60 --prompt-tokens 4096 --methods none seka adaseka --fast-methods none seka adaseka \
    --paths static_loop --fast-repeats 5 --fast-warmup 2 --out $OUT/loop 2>&1 | grep -v -i warn > $OUT/loop.log
tail -12 $OUT/loop.log
