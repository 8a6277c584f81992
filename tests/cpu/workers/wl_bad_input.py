"""Bad checkpoints fail with the tensor's name (and both shapes): a missing tensor, a shape
that disagrees with the config, a config with fewer layers than the weights, and an export whose
source config describes another model. Rank 0 writes the messages.

usage: wl_bad_input.py SRC_PRESET TMP_DIR
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import exit_now, write_result  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from wl_common import build_chunks, setup  # noqa: E402

import archs  # noqa: E402
import weight_loaders as wl  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402


def variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def message(fn) -> str:
    try:
        fn()
    except wl.WeightLoaderError as e:
        return str(e)
    raise AssertionError("no WeightLoaderError raised")


def main():
    src, tmp = ensure_tiny_checkpoint(sys.argv[1]), Path(sys.argv[2])
    parallel = setup(1, 1)
    args = archs.model_args_from_hf(src)
    chunks, config = build_chunks(args, parallel)
    q = "model.layers.1.self_attn.q_proj.weight"
    missing = variant(src, tmp / "missing", lambda t: t.pop(q))
    wide = variant(src, tmp / "wide", lambda t: t.update({q: torch.zeros(160, 128)}))
    fewer = dataclasses.replace(args, num_layers=3)
    fewer_chunks, fewer_config = build_chunks(fewer, dataclasses.replace(parallel))
    write_result(
        {
            "missing": message(lambda: wl.load_hf_into_megatron(chunks, missing, args, config)),
            "shape": message(lambda: wl.load_hf_into_megatron(chunks, wide, args, config)),
            "layers": message(
                lambda: wl.load_hf_into_megatron(fewer_chunks, src, fewer, fewer_config)
            ),
            "export": message(
                lambda: wl.export_megatron_to_hf(
                    fewer_chunks, fewer, fewer_config, tmp / "out", src
                )
            ),
        }
    )


if __name__ == "__main__":
    main()
    exit_now()
