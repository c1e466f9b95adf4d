# Per-GPU streaming throughput alone and with both GPUs busy (scripts/results/contention.py), on nvidia-h200-x2.
source scripts/results/device/env.sh
[ -d /tmp/site/jsonargparse ] || install_wheels "$S"/transformers-*.whl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv
mkdir -p $OUT/contention
python3 scripts/results/contention.py --gpu 0 --out $OUT/contention > $OUT/contention/gpu0.log 2>&1 &
python3 scripts/results/contention.py --gpu 1 --out $OUT/contention > $OUT/contention/gpu1.log 2>&1 &
wait
nproc; cat /proc/loadavg
grep -h '^{' $OUT/contention/gpu*.log
for f in $OUT/contention/gpu*.log; do tail -n 3 "$f"; done; rm -f $OUT/contention/.[a-z]*
