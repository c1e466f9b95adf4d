#!/bin/bash
# On the GPU machine: wait up to $1 s, or until a line of /root/phase starts with $2 (default: done), then print the
# progress and put what exists into $OUT: res.tgz (the result folders, without an interrupted run's saved state),
# partial.tgz (that saved state, for a run to resume on a later machine session with the same package code), dev.tgz (the dev
# runs written on the machine, not the staged ones), logs.tgz, heads.tgz (PASTA's head sets, when built), perf.tgz. Call it as
# `bash /root/repo/.dev/g/s2/watch.sh 500` within 30 s of the previous call.
T=${1:-500}; end=$((SECONDS + T))
while [ $SECONDS -lt $end ]; do grep -q "^${2:-done}" /root/phase 2>/dev/null && break; sleep 5; done
cat /root/phase; grep "INFO results" /root/runner.log | tail -30
for f in /root/repo/outputs/results/logs/final*; do
  [ -f "$f" ] && echo "$(basename "$f"): $(tail -c 300 "$f" | tr '\r' '\n' | tail -1)"
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
cd /root/repo/outputs || exit 1
tar czf "$OUT/res.tgz" --exclude 'predict_partial*' gpures
find gpures -name 'predict_partial*' > /root/partlist  # unfinished runs' saved batches, in case the machine goes
[ -s /root/partlist ] && tar czf "$OUT/partial.tgz" -T /root/partlist
find results/dev -newer /root/staged -type f ! -path '*predict_partial*' 2>/dev/null > /root/devlist
[ -s /root/devlist ] && tar czf "$OUT/dev.tgz" -T /root/devlist
tar czf "$OUT/logs.tgz" results/logs /root/runner.log /root/phase 2>/dev/null
if [ -d results/pasta ]; then tar czf "$OUT/heads.tgz" results/pasta; fi  # PASTA's head sets, to commit beside its results
if [ -d /root/perf ]; then tar czf "$OUT/perf.tgz" -C /root perf; fi
# a file over 16 MiB does not come back from the machine: larger tarballs come back in 15 MiB pieces NAME.part-00,
# NAME.part-01, ...; join them here with `cat NAME.part-* > NAME`
for f in "$OUT"/*.tgz; do
  if [ "$(stat -c %s "$f")" -gt 15728640 ]; then split -b 15M -d "$f" "$f.part-" && rm "$f"; fi
done
ls -la "$OUT"
