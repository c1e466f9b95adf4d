# Timing and kernel profile of unsteered static_loop decoding at batch 1 (scripts/results/decode_profile.py), one H200.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/c7/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
timeout 300 python3 scripts/results/decode_profile.py --out $OUT/profile 2>&1 | grep -v -i warn | tail -45
