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
# verl 0.9.1 patches TRL's AutoModelForCausalLMWithValueHead whenever TRL is importable; TRL
# 1.16 (installed for the TRL row) no longer has that class, and verl's workers die on the
# import. verl's processes (and only they: this folder is on their path alone) get TRL hidden.
cat > "$site/sitecustomize.py" <<'PY'
"""Written by Tandem's install_verl.sh: TRL is invisible to verl's processes (see there)."""
import sys


class _HideTRL:
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden from verl)", name=name)
        return None


sys.meta_path.insert(0, _HideTRL())
PY
PYTHONPATH=$site VERL_USE_EXTERNAL_PLUGINS=none python3 -c "
import transformers, tokenizers, tensordict, vllm, ray, peft, datasets, pyarrow, transfer_queue
import verl, verl.trainer.main_ppo, verl.trainer.ppo.v1, verl.workers.engine_workers
import verl.workers.rollout.vllm_rollout.vllm_async_server
from verl.utils.import_utils import is_trl_available
assert not is_trl_available(), 'TRL is visible to verl'
print('verl', verl.__version__, '| ray', ray.__version__, '| vllm', vllm.__version__, '| transformers',
      transformers.__version__, '| tokenizers', tokenizers.__version__, '| tensordict',
      tensordict.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__,
      '| pyarrow', pyarrow.__version__)
assert transformers.__file__.startswith('$site'), transformers.__file__"
