"""Several cases of one worker script in one torchrun launch.

usage: _cases.py WORKER CASES_JSON   (CASES_JSON: {case id: {"argv": [...], "env": {...}}})

A 2-rank launch spends most of a small case's time importing torch, megatron-core and
transformers (10-15 s a rank on a 2-core host) before the case's own work (seconds). Here each
case runs the worker file afresh (its module-level settings read from the case's environment),
in the order given, on the process group and imports of the one before it; between cases
megatron's parallel state is rebuilt by the next case's `init_model_parallel`, and the default
group stays up (destroying and re-creating it on torchrun's store is not supported). Writes
{case id: the case's result} to $TANDEM_RESULT; the first case that fails ends the launch.
"""

import json
import os
import runpy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

from tandem_core import distributed as D  # noqa: E402


def _destroy_model_parallel_only() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()


def main() -> None:
    worker, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    final = os.environ["TANDEM_RESULT"]
    D.destroy = _destroy_model_parallel_only  # the workers end with D.destroy()
    base_env = dict(os.environ)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case_id, case in cases.items():
            result = Path(tmp) / f"{case_id}.json"  # written by rank 0 only
            os.environ.clear()
            os.environ.update({**base_env, **case["env"], "TANDEM_RESULT": str(result)})
            sys.argv = [str(worker), *case["argv"]]
            runpy.run_path(str(worker), run_name="tandem_case")["main"]()
            if result.exists():
                results[case_id] = json.loads(result.read_text())
    os.environ["TANDEM_RESULT"] = final
    write_result(results)


if __name__ == "__main__":
    main()
    exit_now()
