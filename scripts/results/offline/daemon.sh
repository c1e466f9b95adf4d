#!/bin/bash
# On the GPU machine, in /root/repo (go.sh starts it in its own session): convert the staged models
# (.dev/g/s2/models) into the cache, then run scripts/results/run.py with the arguments in .dev/g/s2/runner_args
# (results in outputs/gpures), then, when .dev/g/s2/perf_args exists, `python -m bench generation` with those
# arguments. Progress goes to /root/phase.
cd /root/repo
export PYTHONPATH=/tmp/site:/root/repo/src PYTHONUNBUFFERED=1 SEKA_CACHE_DIR=/root/models
SEKA_SOURCE_COMMIT=$(cat .dev/g/s2/commit.txt)  # provenance: the copied tree has no .git
export SEKA_SOURCE_COMMIT
echo "start $(date -u +%FT%TZ)" > /root/phase
python3 -c "from seka_lightning.embedded import load_embedded; [load_embedded(m) for m in open('.dev/g/s2/models').read().split()]"
echo "converted rc=$? $(date -u +%FT%TZ)" >> /root/phase
read -ra ARGS < .dev/g/s2/runner_args
python3 scripts/results/run.py "${ARGS[@]}" --out outputs/results --results outputs/gpures > /root/runner.log 2>&1
echo "runner rc=$? $(date -u +%FT%TZ)" >> /root/phase
sha256sum outputs/results/banks/*.safetensors >> /root/phase
if [ -f .dev/g/s2/perf_args ]; then
  read -ra PERF < .dev/g/s2/perf_args
  mkdir -p /root/perf
  python3 -m bench generation "${PERF[@]}" --out /root/perf/generation > /root/perf/perf.log 2>&1
  echo "perf rc=$? $(date -u +%FT%TZ)" >> /root/phase
fi
echo done >> /root/phase
