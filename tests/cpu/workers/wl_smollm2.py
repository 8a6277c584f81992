"""The real SmolLM2-135M-Instruct: HF -> megatron import at this TP (1 or 3: it has 9 heads,
3 KV heads), megatron logits vs transformers logits on a chat prompt.

usage: wl_smollm2.py TP
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import exit_now, write_result  # noqa: E402
from wl_common import build_chunks, hf_logits, megatron_logits, setup  # noqa: E402

import weight_loaders as wl  # noqa: E402
from archs import (
    ensure_preset_dir,  # noqa: E402
    model_args_from_hf,  # noqa: E402
)


def main():
    tp = int(sys.argv[1])
    src = ensure_preset_dir("smollm2_135m")
    parallel = setup(tp, 1)
    args = model_args_from_hf(src)
    chunks, config = build_chunks(args, parallel)
    wl.load_hf_into_megatron(chunks, src, args, config)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 17 + 25?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    tokens = torch.tensor([tok.encode(text)])
    logits = megatron_logits(chunks, config, tokens, args.vocab_size)
    ref = hf_logits(src, tokens) if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        diff = (logits - ref).abs().max().item()
        same_argmax = bool((logits.argmax(-1) == ref.argmax(-1)).all())
        write_result(
            {
                "logits_max_abs_diff": diff,
                "tokens": tokens.shape[1],
                "logit_scale": ref.abs().max().item(),
                "same_argmax": same_argmax,
            }
        )
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_now()
