"""Weight loaders: pure transforms and refusals here; import / logits / stream / export for each
architecture and TP×PP layout in torchrun workers (real megatron-core over gloo, transformers as
the numerical reference)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cases, some_slow

import archs
import weight_loaders as wl
from archs.base import read_hf_config
from tandem_core.model_args import ModelArgs
from weight_loaders.transforms import LAYOUTS

PRESETS = ["tiny_llama", "tiny_llama_tied", "tiny_qwen2", "tiny_mistral", "tiny_qwen3"]
ARGS = ModelArgs(
    arch="qwen2",
    num_layers=2,
    hidden_size=16,
    num_attention_heads=6,
    num_query_groups=2,
    ffn_hidden_size=12,
    vocab_size=130,
    kv_channels=4,
    max_position_embeddings=64,
    qkv_bias=True,
)


# ---- pure transforms --------------------------------------------------------------------------
def test_interleave_qkv_layout_and_inverse():
    hd, heads, groups = ARGS.kv_channels, ARGS.num_attention_heads, ARGS.num_query_groups
    q = torch.arange(heads * hd).float().reshape(-1, 1).expand(-1, 3).clone()
    k = 1000 + torch.arange(groups * hd).float().reshape(-1, 1).expand(-1, 3).clone()
    v = 2000 + torch.arange(groups * hd).float().reshape(-1, 1).expand(-1, 3).clone()
    qkv = wl.interleave_qkv(q, k, v, groups)
    # group 0 = q heads 0..2, k head 0, v head 0 (megatron's per-group order)
    per_group = (heads // groups + 2) * hd
    torch.testing.assert_close(qkv[: 3 * hd], q[: 3 * hd], rtol=0, atol=0)
    torch.testing.assert_close(qkv[3 * hd : 4 * hd], k[:hd], rtol=0, atol=0)
    torch.testing.assert_close(qkv[4 * hd : per_group], v[:hd], rtol=0, atol=0)
    for got, want in zip(wl.deinterleave_qkv(qkv, heads, groups, hd), (q, k, v), strict=True):
        assert torch.equal(got, want)
    # biases (1-D) too
    qb, kb, vb = q[:, 0], k[:, 0], v[:, 0]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            wl.deinterleave_qkv(wl.interleave_qkv(qb, kb, vb, groups), heads, groups, hd),
            (qb, kb, vb),
            strict=True,
        )
    )


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(
    "layout,hf_shapes",
    [
        ("qkv", [(24, 16), (8, 16), (8, 16)]),
        ("qkv", [(24,), (8,), (8,)]),
        ("gate_up", [(12, 16), (12, 16)]),
        ("vocab", [(130, 16)]),
        ("column", [(12, 16)]),
        ("row", [(16, 12)]),
        ("replicated", [(16,)]),
    ],
)
def test_shards_round_trip(layout, hf_shapes, tp):
    """HF -> every TP rank's shard -> HF is exact, and shard shapes match what the megatron
    parameter would be (hf_shapes inverts them)."""
    g = torch.Generator().manual_seed(0)
    hf = [torch.randn(s, generator=g) for s in hf_shapes]
    lay = LAYOUTS[layout]
    shard_shape = {
        "qkv": ((24 + 16) // tp, *hf_shapes[0][1:]),
        "gate_up": (24 // tp, 16),
        "vocab": (ARGS.padded_vocab_size(tp) // tp, 16),
        "column": (12 // tp, 16),
        "row": (16, 12 // tp),
        "replicated": (16,),
    }[layout]
    shards = [wl.hf_to_megatron_shard(layout, hf, shard_shape, ARGS, tp, r) for r in range(tp)]
    assert all(tuple(s.shape) == shard_shape for s in shards)
    assert [tuple(s) for s in lay.hf_shapes(shard_shape, ARGS, tp)] == hf_shapes
    back = wl.megatron_shards_to_hf(layout, shards if lay.gathered else shards[:1], ARGS)
    assert all(torch.equal(a, b) for a, b in zip(back, hf, strict=True))


def test_gate_up_shard_holds_its_gate_then_its_up():
    gate, up = torch.arange(8.0).reshape(8, 1), 100 + torch.arange(8.0).reshape(8, 1)
    shard1 = wl.hf_to_megatron_shard("gate_up", [gate, up], (8, 1), ARGS, 2, 1)
    assert shard1.flatten().tolist() == [4, 5, 6, 7, 104, 105, 106, 107]


def test_vocab_padding_is_zero_and_dropped():
    emb = torch.randn(130, 4)
    last = wl.hf_to_megatron_shard("vocab", [emb], (128, 4), ARGS, 2, 1)  # rows 128..255
    assert torch.equal(last[:2], emb[128:]) and not last[2:].any()


def test_bucket_limits():
    pairs = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    buckets = list(wl.bucket(iter(pairs), bucket_mb=3 / 1024))
    assert [len(b) for b in buckets] == [3, 3, 3, 1]
    assert [len(b) for b in wl.bucket(iter(pairs), bucket_mb=0.0001)] == [1] * 10


# ---- direct copies into an engine sharded like megatron ---------------------------------------
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _hf_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    hd, h, f = args.kv_channels, args.hidden_size, args.ffn_hidden_size
    shapes = {
        "embed_tokens": (args.vocab_size, h),
        "lm_head": (args.vocab_size, h),
        "q_proj.weight": (args.num_attention_heads * hd, h),
        "k_proj.weight": (args.num_query_groups * hd, h),
        "v_proj.weight": (args.num_query_groups * hd, h),
        "q_proj.bias": (args.num_attention_heads * hd,),
        "k_proj.bias": (args.num_query_groups * hd,),
        "v_proj.bias": (args.num_query_groups * hd,),
        "o_proj": (h, args.num_attention_heads * hd),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
        "norm": (h,),
    }
    out = {}
    for name in wl.expected_hf_names(args):
        key = next(k for k in shapes if k in name) if "layernorm" not in name else "norm"
        out[name] = torch.randn(shapes[key], generator=g)
    return out


def _megatron_rank(hf: dict, args: ModelArgs, tp: int, rank: int) -> list[tuple[str, torch.Tensor]]:
    """Every megatron tensor of TP rank `rank` (global layer names), built by the importer's math."""
    out = []
    for pattern, rule in wl.weight_map(args).items():
        for i in range(args.num_layers) if "{i}" in pattern else [None]:
            if pattern == "output_layer.weight" and args.tie_word_embeddings:
                continue
            parts = [hf[h.format(i=i)] for h in rule.hf]
            shape = (args.padded_vocab_size(tp) // tp, args.hidden_size)
            shard = wl.hf_to_megatron_shard(rule.layout, parts, shape, args, tp, rank)
            out.append((pattern.format(i=i), shard))
    return out


def _engine_rank(hf: dict, args: ModelArgs, tp: int, rank: int, vocab_rows: int):
    """What a vLLM-style engine (packed qkv/gate_up, HF row order, TP rank `rank`) should hold."""
    want = {}
    for pattern, rule in wl.weight_map(args).items():
        for i in range(args.num_layers) if "{i}" in pattern else [None]:
            names = [h.format(i=i) for h in rule.hf]
            parts = [hf[n] for n in names]
            if rule.layout == "vocab":  # the engine's own padding and split
                full = torch.cat(
                    [parts[0], parts[0].new_zeros(vocab_rows * tp - len(parts[0]), 16)]
                )
                want[names[0]] = full[rank * vocab_rows : (rank + 1) * vocab_rows]
                continue
            index = LAYOUTS[rule.layout].shard_index([p.shape for p in parts], args, tp, rank)
            local = torch.cat([p[ix] for p, ix in zip(parts, index, strict=True)])
            fused = {"qkv": "qkv_proj", "gate_up": "gate_up_proj"}.get(rule.layout)
            name = names[0].replace(names[0].split(".")[-2], fused) if fused else names[0]
            want[name] = local
    return want


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("engine_pad", [256, 64])  # megatron's padded vocab at TP 2; vLLM's
def test_direct_copies_fill_a_packed_engine(tp, engine_pad):
    hf = _hf_state(ARGS)
    vocab_rows = -(-ARGS.vocab_size // engine_pad) * engine_pad // tp  # vLLM: pad, then split
    for rank in range(tp):
        want = _engine_rank(hf, ARGS, tp, rank, vocab_rows)
        params = {n: torch.zeros_like(t) for n, t in want.items()}
        shards = _megatron_rank(hf, ARGS, tp, rank)
        plan = wl.plan_direct_copies(shards, ARGS, params, PACKED, tp, tp)
        plan.copy()
        vocab_mapped = engine_pad == 256 or tp == 1
        assert plan.remaining == (
            [] if vocab_mapped else ["embedding.word_embeddings.weight", "output_layer.weight"]
        )
        for name, got in params.items():
            if "embed_tokens" in name or "lm_head" in name:
                if not vocab_mapped:
                    assert not got.any(), name
                    continue
                got, expect = got[: ARGS.vocab_size], want[name][: ARGS.vocab_size]
            else:
                expect = want[name]
            assert torch.equal(got, expect), name
        assert plan.first_mismatch() is None


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("module", ["experts", "experts.routed_experts"])  # vLLM < / ≥ 0.24
def test_direct_copies_fill_stacked_experts(tp, module):
    """vLLM stacks a MoE layer's experts (w13 [E, 2I/TP, H]: each expert's gate rows, then its
    up rows; w2 [E, H, I/TP]); the vLLM backend names each expert's piece like HF's per-expert
    tensors, and every expert's megatron fc1/fc2 shard then tiles them."""
    from rollout.base import experts_by_name

    args = archs.PRESETS["tiny_qwen3_moe"].args
    E, h, f = args.num_experts, args.hidden_size, args.moe_ffn_hidden_size
    g = torch.Generator().manual_seed(5)
    hf = {
        f"model.layers.0.mlp.experts.{e}.{kind}.weight": torch.randn(shape, generator=g)
        for e in range(E)
        for kind, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f)))
    }
    w13, w2 = (f"model.layers.0.mlp.{module}.{kind}" for kind in ("w13_weight", "w2_weight"))
    q = f // tp
    for rank in range(tp):
        stacked = {w13: torch.zeros(E, 2 * q, h), w2: torch.zeros(E, h, q)}
        shards = [
            (
                pattern.format(i=0, e=e),
                wl.hf_to_megatron_shard(
                    rule.layout, [hf[n.format(i=0, e=e)] for n in rule.hf], None, args, tp, rank
                ),
            )
            for pattern, rule in wl.weight_map(args).items()
            if "{e}" in pattern
            for e in range(E)
        ]
        plan = wl.plan_direct_copies(shards, args, experts_by_name(stacked), PACKED, tp, tp)
        assert plan.remaining == [] and len(plan.names) == 3 * E  # gate, up, down per expert
        plan.copy()
        rows = slice(rank * q, (rank + 1) * q)
        for e in range(E):
            expert = f"model.layers.0.mlp.experts.{e}"
            assert torch.equal(stacked[w13][e, :q], hf[f"{expert}.gate_proj.weight"][rows])
            assert torch.equal(stacked[w13][e, q:], hf[f"{expert}.up_proj.weight"][rows])
            assert torch.equal(stacked[w2][e], hf[f"{expert}.down_proj.weight"][:, rows])


def test_copy_runs_merge_what_lies_back_to_back_on_both_sides(monkeypatch):
    """Pairs adjacent in the engine's storage and in megatron's become one flat copy; the big
    ones get their own copy_, the rest one foreach; every byte lands where the pairs say."""
    monkeypatch.setattr(wl.direct_copy, "BIG_COPY_BYTES", 64 * 4)  # 64 fp32 values
    src, dst = torch.randn(400), torch.zeros(400)
    # (src start, dst start, length): 0-1 adjacent on both sides, 2 follows 1 only in src,
    # 3 is a 2-D block (gate/up-like rows), 4 follows 3 on both sides, 5-6 are evenly spaced
    # but backwards in src (no stack: a view cannot step backwards).
    cuts = [(0, 100, 40), (40, 140, 40), (80, 0, 30), (200, 200, 2 * 20), (240, 240, 60)]
    cuts += [(360, 300, 20), (340, 320, 20)]
    pairs_dst = [dst[d : d + n] for _, d, n in cuts]
    pairs_src = [src[s : s + n] for s, _, n in cuts]
    pairs_dst[3], pairs_src[3] = pairs_dst[3].view(2, 20), pairs_src[3].view(2, 20)
    runs = wl.direct_copy.CopyRuns.plan(pairs_dst, pairs_src)
    assert [d.numel() for d, _ in runs.big] == [80, 100]  # 0+1 and 3+4 merged
    assert [d.numel() for d in runs.small_dst] == [30, 20, 20]
    assert runs.launches == 3
    runs.copy()
    want = torch.zeros(400)
    for s, d, n in cuts:
        want[d : d + n] = src[s : s + n]
    assert torch.equal(dst, want)


@pytest.mark.parametrize("engine_tp", [1, 2])
def test_copy_runs_copy_every_expert_of_a_layer_at_once(monkeypatch, engine_tp):
    """The grouped experts stack each expert's fc1 [2f, h] and fc2 [h, f] as vLLM's w13
    [E, 2f, h] and w2 [E, h, f] do: into an engine holding whole experts (TP 1) the 3·E
    per-expert pairs (gate, up, down) merge into one flat copy per tensor; into an engine TP
    rank's half (gate and up rows r·f/2…, fc2 columns r·f/2…) they stack into one strided copy
    per tensor. Below the size of a copy of its own, a strided stack goes back to its pieces in
    the foreach. Either way the engine's tensors come out exactly."""
    from weight_loaders.stream import ExpertShard, per_expert

    E, h, f = 4, 8, 4
    weight1, weight2 = torch.randn(E * 2 * f, h), torch.randn(E * h, f)
    rows = f // engine_tp  # this engine rank's gate (and up) rows, and fc2 columns
    w13, w2 = torch.zeros(E, 2 * rows, h), torch.zeros(E, h, rows)
    dst, src = [], []
    shard = ExpertShard(E, 0)
    for e, (_, fc1) in enumerate(per_expert("mlp.experts.weight1", weight1, shard)):
        dst += [w13[e, :rows], w13[e, rows:]]
        src += [fc1[:rows], fc1[f : f + rows]]
    for e, (_, fc2) in enumerate(per_expert("mlp.experts.weight2", weight2, shard)):
        dst.append(w2[e])
        src.append(fc2[:, :rows])
    small = wl.direct_copy.CopyRuns.plan(dst, src)
    assert small.launches == 1
    monkeypatch.setattr(wl.direct_copy, "BIG_COPY_BYTES", 32)
    runs = wl.direct_copy.CopyRuns.plan(dst, src)
    assert runs.launches == 2 and not runs.small_dst
    assert [d.numel() for d, _ in runs.big] == [E * 2 * rows * h, E * h * rows]
    assert all(s.is_contiguous() == (engine_tp == 1) for _, s in runs.big)
    runs.copy()
    fc1 = weight1.view(E, 2, f, h)[:, :, :rows].reshape(E, 2 * rows, h)
    assert torch.equal(w13, fc1) and torch.equal(w2, weight2.view(E, h, f)[..., :rows])


def test_one_kernel_copies_every_planned_range(monkeypatch):
    """The Triton range copy (a candidate for the sync, timed by bench_swap on GPUs), run by
    Triton's interpreter: every range lands where its pair says and nothing else is written;
    pairs it cannot copy as whole aligned words of one dtype are refused."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from weight_loaders import copy_kernel

    copy_kernel._kernel.cache_clear()
    try:
        src = torch.randn(3000, dtype=torch.bfloat16)
        dst = torch.zeros(3000, dtype=torch.bfloat16)
        cuts = [(0, 2000, 1000), (1000, 0, 400), (1400, 800, 600)]  # (src, dst, length)
        pairs = [(dst[d : d + n], src[s : s + n]) for s, d, n in cuts]
        pairs[2] = (pairs[2][0].view(2, 300), pairs[2][1].view(2, 300))
        copy_kernel.RangeCopy(pairs, block=128).copy()
        want = torch.zeros_like(dst)
        for s, d, n in cuts:
            want[d : d + n] = src[s : s + n]
        assert torch.equal(dst, want)
    finally:
        copy_kernel._kernel.cache_clear()
    fits = copy_kernel.RangeCopy.fits
    assert fits(dst[:4], src[4:8])
    assert not fits(dst[:6], src[:6])  # 12 bytes: not whole words
    assert not fits(dst[1:5], src[:4])  # not 8-byte aligned
    assert not fits(dst[:8:2], src[:4])  # strided
    assert not fits(dst[:4], src[:4].float()[:2])  # a cast is not a byte copy
    with pytest.raises(ValueError, match="pair 0"):
        copy_kernel.RangeCopy([(dst[:6], src[:6])])


def test_copy_runs_take_every_contiguous_piece_into_one_launch(monkeypatch, caplog):
    """On CUDA the sync's contiguous pieces (a strided stack as its pieces) go into one
    RangeCopy launch (here through Triton's interpreter); a cast stays with torch. Its first
    copy checks every piece; a source buffer that moved rebuilds the table (not a write through
    a stale address), one released is an error; and where the kernel cannot run, a warning says
    so and torch copies the same pieces from then on."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from weight_loaders import copy_kernel

    copy_kernel._kernel.cache_clear()
    try:
        buffer, dst = (
            torch.randn(1200, dtype=torch.bfloat16),
            torch.zeros(800, dtype=torch.bfloat16),
        )
        src = buffer[400:]  # a view into a buffer that will move
        cast_src, cast_dst = torch.randn(16), torch.zeros(16, dtype=torch.bfloat16)
        # (src, dst, length): 0-1 back to back on both sides; 2-4 evenly spaced on both sides
        # (a strided stack); 5 alone
        cuts = [(0, 100, 40), (40, 140, 40), (200, 400, 16), (232, 432, 16), (264, 464, 16)]
        cuts.append((500, 600, 64))
        pairs_dst = [dst[d : d + n] for _, d, n in cuts] + [cast_dst]
        pairs_src = [src[s : s + n] for s, _, n in cuts] + [cast_src]

        def want() -> torch.Tensor:
            out = torch.zeros_like(dst)
            for s, d, n in cuts:
                out[d : d + n] = src[s : s + n]
            return out

        runs = wl.direct_copy.CopyRuns.plan(pairs_dst, pairs_src, one_launch=True)
        assert [d.numel() for d, _ in runs.ranges.pairs] == [80, 16, 16, 16, 64]
        assert runs.small_dst == [cast_dst] and runs.launches == 2
        runs.copy()
        assert runs.ranges_checked and torch.equal(dst, want())
        assert torch.equal(cast_dst, cast_src.bfloat16())

        old = buffer.data_ptr()
        # Grown while it holds memory: its bytes move to a new block (the old one still held
        # during the allocation), as a released and regrown buffer may.
        buffer.untyped_storage().resize_(2 * 1200 * 2)
        assert buffer.data_ptr() != old
        buffer.normal_()
        runs.copy()
        assert torch.equal(dst, want())
        buffer.untyped_storage().resize_(0)  # released, as a gathered pipeline stage is
        with pytest.raises(RuntimeError, match="holds no memory"):
            runs.copy()
        buffer.untyped_storage().resize_(1200 * 2)

        def broken(self):
            raise RuntimeError("no Triton backend")

        monkeypatch.setattr(copy_kernel.RangeCopy, "copy", broken)
        fresh = wl.direct_copy.CopyRuns.plan(pairs_dst, pairs_src, one_launch=True)
        buffer.normal_()
        with caplog.at_level("WARNING"):
            fresh.copy()
        assert "range copy is off (RuntimeError: no Triton backend)" in caplog.text
        assert fresh.ranges is None and torch.equal(dst, want())
        assert len(fresh.small_dst) == 6  # the five ranged pieces and the cast
    finally:
        copy_kernel._kernel.cache_clear()
    assert wl.direct_copy.CopyRuns.plan(pairs_dst, pairs_src).ranges is None  # CPU: torch only


def test_experts_under_training_ep_stay_with_the_loader():
    """At EP 2 a rank holds half of every layer's experts and the engine all of them: copying
    this rank's would leave the other half stale (seen on CUDA vLLM: log-probs off by 0.014
    after the first update). Without an EP group to gather them over (`ep_group`; the gathers
    straight into the engine are checked in test_hybrid_engine.py::test_swaps_moe) the
    experts go by the stream, which gathers them over EP; the rest still maps."""
    from rollout.base import experts_by_name

    args = archs.PRESETS["tiny_qwen3_moe"].args
    E, h, f = args.num_experts, args.hidden_size, args.moe_ffn_hidden_size
    stacked = {
        "model.layers.0.mlp.experts.w13_weight": torch.zeros(E, 2 * f, h),
        "model.layers.0.mlp.experts.w2_weight": torch.zeros(E, h, f),
        "model.layers.0.mlp.gate.weight": torch.zeros(E, h),
    }
    mine = range(E // 2, E)  # EP rank 1's experts, under their global numbers
    shards = [
        (pattern.format(i=0, e=e), torch.ones((2 * f, h) if "fc1" in pattern else (h, f)))
        for pattern in wl.weight_map(args)
        if "{e}" in pattern
        for e in mine
    ]
    shards.append(("decoder.layers.0.mlp.router.weight", torch.ones(E, h)))
    at_ep1 = wl.plan_direct_copies(shards, args, experts_by_name(stacked), PACKED, 1, 1)
    assert at_ep1.remaining == []  # the same shards map when they are all the experts there are
    plan = wl.plan_direct_copies(shards, args, experts_by_name(stacked), PACKED, 1, 1, ep_size=2)
    assert plan.names == ["decoder.layers.0.mlp.router.weight"]
    assert sorted(plan.remaining) == sorted(name for name, _ in shards[:-1])


def test_the_ep_gather_refuses_experts_out_of_order():
    """with_every_expert pairs the EP ranks' experts by position, so each rank must give its
    experts of a layer tensor in ascending order. EP rank 1 of 128 experts in the order a sort
    by name gives ('local_experts.100' first, '64' after '127') is refused at the first expert
    out of place; the module's order passes, the other tensors untouched."""
    from weight_loaders.stream import experts_in_step

    fc1 = "decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc1.weight"
    fc2 = "decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc2.weight"
    mine = range(64, 128)
    in_order = [(p.format(e=e), None) for e in mine for p in (fc1, fc2)]
    in_order.append(("decoder.layers.3.mlp.router.weight", None))
    seen = [(name, expert) for name, _, _, _, expert in experts_in_step(in_order, 1, 64)]
    assert [e for _, e in seen] == [e for e in mine for _ in (fc1, fc2)] + [None]
    by_name = sorted(in_order, key=lambda kv: kv[0])
    assert by_name[0][0] == fc1.format(e=100)
    with pytest.raises(RuntimeError, match=r"local_experts\.64\.linear_fc1.* out of order"):
        list(experts_in_step(by_name, 1, 64))
    with pytest.raises(RuntimeError, match="expert 3 out of order on EP rank 1"):  # rank 0's
        list(experts_in_step([(fc1.format(e=3), None)], 1, 64))


def test_shards_of_two_training_ranks_fill_one_engine_rank():
    """Training TP 2 into a packed engine at TP 1 (what the gathered copies plan from the two
    gathered shards): QKV per group, gate/up, row-parallel columns, vocab rows all tile it."""
    hf = _hf_state(ARGS)
    want = _engine_rank(hf, ARGS, 1, 0, vocab_rows=192)  # vLLM pads 130 to 192
    params = {n: torch.zeros_like(t) for n, t in want.items()}
    ranks = [dict(_megatron_rank(hf, ARGS, 2, r)) for r in range(2)]
    for name in ranks[0]:
        replicated = "layernorm" in name  # the same tensor on both ranks: one is the whole
        shards = [ranks[0][name]] if replicated else [ranks[0][name], ranks[1][name]]
        pairs = wl.direct_copy.plan_tensor(name, shards, ARGS, params, PACKED, engine_tp=1)
        assert pairs, name
        for dst, src in pairs:
            dst.copy_(src)
    for name, got in params.items():
        rows = ARGS.vocab_size if ("embed" in name or "lm_head" in name) else len(got)
        assert torch.equal(got[:rows], want[name][:rows]), name


def test_direct_copies_unpacked_engine_and_tp_mismatch():
    hf = _hf_state(ARGS)
    params = {n: torch.zeros_like(t) for n, t in hf.items()}  # transformers' own names
    plan = wl.plan_direct_copies(_megatron_rank(hf, ARGS, 1, 0), ARGS, params, {}, 1, 1)
    plan.copy()
    assert plan.remaining == [] and all(torch.equal(params[n], hf[n]) for n in hf)
    # Training TP 2 into an engine at TP 1: only the replicated norms map directly.
    params = {n: torch.zeros_like(t) for n, t in hf.items()}
    plan = wl.plan_direct_copies(_megatron_rank(hf, ARGS, 2, 0), ARGS, params, {}, 2, 1)
    assert set(plan.names) == {n for n in plan.names if "layernorm" in n}
    assert len(plan.remaining) == 2 + ARGS.num_layers * 5 and plan.names  # qkv w+b, proj, fc1, fc2
    plan.copy(keep=lambda name: "layers.1." not in name)  # a filtered copy skips layer 1
    norms = [n for n in hf if "layernorm" in n or n == "model.norm.weight"]
    assert all(torch.equal(params[n], hf[n]) != ("layers.1." in n) for n in norms)


# ---- configs: dispatch and refusals -----------------------------------------------------------
@pytest.mark.parametrize(
    "preset,arch,tied,bias",
    [
        ("tiny_llama", "llama", False, False),
        ("tiny_llama_tied", "llama", True, False),
        ("tiny_qwen2", "qwen2", True, True),
        ("tiny_mistral", "mistral", False, False),
    ],
)
def test_model_args_from_hf(tiny_ckpt, preset, arch, tied, bias):
    args = archs.model_args_from_hf(tiny_ckpt(preset))
    assert (args.arch, args.tie_word_embeddings, args.qkv_bias) == (arch, tied, bias)
    assert (args.num_layers, args.num_query_groups, args.kv_channels) == (4, 2, 32)
    assert args.rope_theta == (1e6 if arch == "qwen2" else 1e4) and args.norm_eps == 1e-6


def _cfg(tiny_ckpt, preset, **changes):
    cfg = read_hf_config(tiny_ckpt(preset))
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "preset,changes,key",
    [
        ("tiny_mistral", {"sliding_window": 128}, "sliding_window"),
        ("tiny_qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ("tiny_llama", {"attention_bias": True}, "attention_bias"),
        ("tiny_llama", {"mlp_bias": True}, "mlp_bias"),
        (
            "tiny_llama",
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
            "rope_parameters",
        ),
        ("tiny_llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ("tiny_llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("tiny_llama", {"model_type": "gpt2"}, "gpt2"),
    ],
)
def test_unsupported_features_are_refused(tiny_ckpt, preset, changes, key):
    with pytest.raises(archs.UnsupportedModelError, match=key):
        archs.model_args_from_hf(_cfg(tiny_ckpt, preset, **changes))


def test_window_as_long_as_the_context_is_accepted(tiny_ckpt):
    cfg = _cfg(tiny_ckpt, "tiny_mistral", sliding_window=512)
    assert archs.model_args_from_hf(cfg).arch == "mistral"


def test_name_check_names_the_missing_and_the_unexpected(tiny_ckpt):
    from weight_loaders.hf_import import check_names

    args = archs.model_args_from_hf(tiny_ckpt("tiny_qwen2"))
    names = set(wl.expected_hf_names(args))
    check_names(names, args)
    with pytest.raises(wl.WeightLoaderError, match="model.layers.2.self_attn.k_proj.bias"):
        check_names(names - {"model.layers.2.self_attn.k_proj.bias"}, args)
    with pytest.raises(wl.WeightLoaderError, match="model.layers.0.self_attn.q_norm.weight"):
        check_names(names | {"model.layers.0.self_attn.q_norm.weight"}, args)


# ---- real megatron-core layouts ---------------------------------------------------------------
# (TP, PP, VPP, ranks) of the fast set, run in one torchrun launch (a launch's imports cost
# more than these checks); PP 2 with interleaved chunks holds plain PP 2's numbering and more.
FAST_LAYOUTS = [(2, 1, 0, 2), (1, 2, 2, 2)]


@pytest.fixture(scope="module")
def fast_layouts(tiny_ckpt, tmp_path_factory) -> dict:
    for p in PRESETS:
        tiny_ckpt(p)  # build in this process, not racing in the workers
    cases = {
        f"{tp}-{pp}-{vpp}": (nproc, [tp, pp, vpp, tmp_path_factory.mktemp("layout"), *PRESETS], {})
        for tp, pp, vpp, nproc in FAST_LAYOUTS
    }
    return run_cases("wl_layout.py", cases)


@pytest.mark.parametrize(
    "tp,pp,vpp,nproc",
    [
        pytest.param(1, 1, 0, 1, marks=pytest.mark.slow),
        *FAST_LAYOUTS,
        pytest.param(2, 2, 0, 4, marks=pytest.mark.slow),
        pytest.param(1, 2, 0, 2, marks=pytest.mark.slow),
    ],
)
def test_layout_import_logits_stream_export(
    request, torchrun, tiny_ckpt, tmp_path, tp, pp, vpp, nproc
):
    if (tp, pp, vpp, nproc) in FAST_LAYOUTS:
        res = request.getfixturevalue("fast_layouts")[f"{tp}-{pp}-{vpp}"]
    else:
        for p in PRESETS:
            tiny_ckpt(p)  # build in this process, not racing in the workers
        res = torchrun("wl_layout.py", nproc, str(tp), str(pp), str(vpp), str(tmp_path), *PRESETS)
    for preset in PRESETS:
        r = res[preset]
        assert r["logits_max_abs_diff"] < 1e-5
        assert r["exported"] == r["source"] == r["streamed"]
        assert r["hf_reload_equal"]


def test_bad_checkpoints_name_the_tensor(torchrun, tiny_ckpt, tmp_path):
    tiny_ckpt("tiny_llama")
    msg = torchrun("wl_bad_input.py", 1, "tiny_llama", str(tmp_path))
    assert (
        "model.layers.1.self_attn.q_proj.weight" in msg["missing"] and "missing" in msg["missing"]
    )
    assert "model.layers.1.self_attn.q_proj.weight" in msg["shape"]
    assert "[160, 128]" in msg["shape"] and "[128, 128]" in msg["shape"]
    assert "model.layers.3." in msg["layers"]
    assert "num_layers" in msg["export"]


@pytest.mark.parametrize("tp", some_slow([1, 3], {1, 3}))  # the GGUF conversion: ~40 s of CI
def test_smollm2_logits_equal_hf(torchrun, cache_dir, tp):
    from archs import ensure_preset_dir

    ensure_preset_dir("smollm2_135m", cache_dir)  # built once, before the ranks start
    res = torchrun("wl_smollm2.py", tp, str(tp))
    assert res["tokens"] > 10 and res["same_argmax"]
    # TP=1 runs the same fp32 ops as transformers. TP=3 sums each row-parallel matmul in three
    # partial products plus an all-reduce: a different fp32 summation order through 30 layers,
    # seen at 6.3e-5 absolute on logits of magnitude ~39; the bound is relative.
    assert res["logits_max_abs_diff"] < 1e-5 * max(1.0, res["logit_scale"] if tp > 1 else 1.0)


@pytest.mark.parametrize(
    "preset", some_slow(["tiny_llama", "tiny_qwen2", "tiny_qwen3"], {"tiny_llama", "tiny_qwen2"})
)
def test_vllm_loads_export_and_streamed_weights(torchrun, tiny_ckpt, tmp_path, preset):
    """Export -> vLLM greedy == HF greedy; streamed in-place reload == HF (tied included)."""
    tiny_ckpt(preset)
    res = torchrun("wl_vllm.py", 1, preset, str(tmp_path))
    assert len(res["before"]) == 3
    assert res["reload_checked"]
    assert res["before"] != res["after"] and res["buckets"] > 1
    assert res["after_logprob_max_abs_diff"] < 1e-4


def test_full_tensors_fill_packed_engine_parameters():
    """FSDP2's whole HF tensors into a vLLM-like TP-1 engine: q, k, v into their rows of
    qkv_proj, gate and up into gate_up_proj, the vocabulary into the real rows of a padded
    embedding; a packed parameter missing a member is left to the loader."""
    h, q, kv, f, vocab = 8, 8, 4, 12, 10
    hf = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(q, h),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(kv, h),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(kv, h),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(f, h),
        "model.layers.0.mlp.up_proj.weight": torch.randn(f, h),
        "model.layers.0.input_layernorm.weight": torch.randn(h),
        "model.embed_tokens.weight": torch.randn(vocab, h),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(q, h),  # its k, v are absent
    }
    engine = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(q + 2 * kv, h),
        "model.layers.0.mlp.gate_up_proj.weight": torch.zeros(2 * f, h),
        "model.layers.0.input_layernorm.weight": torch.zeros(h),
        "model.embed_tokens.weight": torch.zeros(64, h),  # padded to 64 rows
        "model.layers.1.self_attn.qkv_proj.weight": torch.zeros(q + 2 * kv, h),
    }
    plan = wl.plan_full_tensor_copies({k: v.shape for k, v in hf.items()}, engine, PACKED)
    assert "model.layers.1.self_attn.q_proj.weight" not in plan
    assert len(plan) == len(hf) - 1
    for name, view in plan.items():
        view.copy_(hf[name])
    qkv = engine["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv[:q], hf["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(qkv[q + kv :], hf["model.layers.0.self_attn.v_proj.weight"])
    gate_up = engine["model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(gate_up[f:], hf["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(engine["model.embed_tokens.weight"][:vocab], hf["model.embed_tokens.weight"])
    assert not engine["model.embed_tokens.weight"][vocab:].any()
