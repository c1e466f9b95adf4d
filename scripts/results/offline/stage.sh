#!/bin/bash
# On the GPU machine: copy staging piece NN (00-06, each carried in its own call as .dev/g/qNN) to /root/stage, which
# lasts while the machine stays warm; piece 00 also prints the machine's versions.
set -e
NN=$1
mkdir -p /root/stage
if [ "$NN" = 04 ]; then rm -rf /root/stage/q04; cp -r .dev/g/q04 /root/stage/q04; else cp .dev/g/q$NN/* /root/stage/; fi
ls -la /root/stage
if [ "$NN" = 00 ]; then
  pwd; python3 -c "import sys,torch,transformers,pyarrow,tokenizers;print(sys.version.split()[0],torch.__version__,transformers.__version__,pyarrow.__version__,tokenizers.__version__)"
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
fi
