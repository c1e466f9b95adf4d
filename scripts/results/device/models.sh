# The real-model runs of session 2, in parallel processes (the two small models leave the GPUs mostly idle):
#   Gemma-3-270M: lost-in-the-middle for SPA and AdaSEKA (defaults from the committed dev search), the learned
#     routing gate and AdaSEKA-with-gate on CounterFact;
#   SmolLM2-135M: a finer dev search (adds top_pct up to 1.0 and gains to 32), then seka / random / adaseka / adaseka_gate on all
#     four benchmarks with the new defaults, and the learned routing gate;
#   the sharded-model check (one model split over both GPUs with device_map).
source scripts/results/device/env.sh
R=/root/run; mkdir -p $R $OUT
END=$((SECONDS + 555))  # every process stops by then, so the results still come back inside the call's limit
run() { local log=$1; shift; timeout $((END - SECONDS)) python3 scripts/results/run_all.py --out $R --shared $S/shared "$@" > $R/$log.log 2>&1; echo "$log rc=$?" >> $R/done.txt; }
waitfor() { while [ $SECONDS -lt $END ]; do [ -e "$1" ] && return 0; sleep 1; done; return 1; }
G="--model embedded:gemma3-270m --tag gemma3-270m --bos --litm-batch 100"
M="--model embedded:smollm2-135m --tag smollm2-135m"
E=$R/experts
CUDA_VISIBLE_DEVICES=0 run g-main $G --search-from docs/results/search/gemma3-270m.json --stages search build experts gate eval \
    --benchmarks lost_in_the_middle counterfact --methods spa adaseka_gate &
(waitfor $E/gemma3-270m/lost_in_the_middle.safetensors && CUDA_VISIBLE_DEVICES=0 run g-ada $G --stages eval \
    --benchmarks lost_in_the_middle --methods adaseka) &
CUDA_VISIBLE_DEVICES=1 run s-main $M --stages build search experts gate eval --search-layers all last20 last15 last10 \
    --search-gains 2 4 8 16 32 --search-min-diffs 0 --search-top-pcts 0.9 0.95 0.97 0.99 1.0 \
    --benchmarks counterfact pronchange biasbios --methods seka random adaseka adaseka_gate &
for m in seka random; do
  (sleep 5; waitfor $R/search/smollm2-135m.json && CUDA_VISIBLE_DEVICES=1 run s-litm-$m $M --stages eval \
      --benchmarks lost_in_the_middle --methods $m) &
done
(waitfor $E/smollm2-135m/lost_in_the_middle.safetensors && CUDA_VISIBLE_DEVICES=0 run s-litm-adaseka $M --stages eval \
    --benchmarks lost_in_the_middle --methods adaseka) &
(waitfor $R/gates/smollm2-135m.safetensors && CUDA_VISIBLE_DEVICES=0 run s-litm-gate $M --stages eval \
    --benchmarks lost_in_the_middle --methods adaseka_gate) &
(timeout 300 python3 scripts/results/sharded_check.py --model embedded:smollm2-135m --shared $S/shared --out $R/sharded \
    > $R/sharded.log 2>&1; echo "sharded rc=$?" >> $R/done.txt) &
wait
cat $R/done.txt; nvidia-smi --query-gpu=name,memory.used --format=csv
cd $R && tar czf $OUT/results.tgz --exclude='*.safetensors' --exclude='predictions.jsonl' . && ls -la $OUT
