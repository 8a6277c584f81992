#!/bin/bash
# On the GPU machine, after Tandem's install (../shared/tools/gpu-vllm/install.sh), with the
# contents of .gpu-wheels/verl1 and verl2 (pack_verl.sh) gathered in one folder ($1, default
# /tmp/vwh): joins ray's wheel, installs verl and its missing dependencies (no index, no
# dependency resolution) and writes verl's PYTHONPATH-first folder ($2, default /tmp/verlsite),
# then imports verl's GRPO path under it and prints the versions.
set -euo pipefail
src=${1:-/tmp/vwh}; site=${2:-/tmp/verlsite}
parts=("$src"/ray-*.whl.part_*)
cat "${parts[@]}" > "$src/$(basename "${parts[0]}" .part_aa)"
rm -f "${parts[@]}"
python3 -m pip install -q --no-deps --no-index --no-compile "$src"/*.whl 2>&1 | grep -v WARNING || true
rm -rf "$site"
python3 -m pip install -q --no-deps --no-index --no-compile --target "$site" "$src"/site/*.whl 2>&1 \
  | grep -v WARNING || true
PYTHONPATH=$site VERL_USE_EXTERNAL_PLUGINS=none python3 -c "
import transformers, tokenizers, tensordict, vllm, ray, peft, datasets, pyarrow, transfer_queue
import verl, verl.trainer.main_ppo, verl.trainer.ppo.v1, verl.workers.engine_workers
import verl.workers.rollout.vllm_rollout.vllm_async_server
print('verl', verl.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__, '| transformers',
      transformers.__version__, '| tokenizers', tokenizers.__version__, '| tensordict',
      tensordict.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__,
      '| pyarrow', pyarrow.__version__)
assert transformers.__file__.startswith('$site'), transformers.__file__"
