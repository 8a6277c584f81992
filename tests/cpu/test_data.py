"""Parquet prompts, the resumable loader, and the arithmetic task."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from archs.checkpoints import build_char_tokenizer
from trainer import data as D
from trainer.rewards import REWARDS


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def arith_files(tmp_path_factory):
    return D.write_arith_task(tmp_path_factory.mktemp("arith"), 40, 10, max_operand=20, seed=3)


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _row(content="What is 1 + 1?", truth="2"):
    return {
        "prompt": [{"role": "user", "content": content}],
        "reward_model": {"ground_truth": truth},
        "data_source": "t",
    }


@pytest.mark.parametrize("preset", ["qwen2_0p5b", "tiny_llama_tied"])
def test_character_tokenizer_survives_a_saved_directory(preset, tok, tmp_path):
    """As the trainer loads it (AutoTokenizer over a written directory): the in-memory ids, and
    spaces and newlines kept. Transformers 5 loads a qwen2 directory's tokenizer as
    Qwen2Tokenizer, whose ByteLevel step once dropped both from a plain-spelled vocabulary."""
    from transformers import AutoTokenizer

    import archs

    loaded = AutoTokenizer.from_pretrained(archs.ensure_preset_dir(preset, tmp_path, weights=False))
    text = "What is 13 + 7?\n\tok <|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert len(tok.encode("a b")) == 3


# ---- the arithmetic task ---------------------------------------------------------------------
def test_write_arith_task(tmp_path, arith_files):
    train, val = arith_files
    t = pq.read_table(train).to_pylist()
    v = pq.read_table(val).to_pylist()
    assert len(t) == 40 and len(v) == 10
    prompts = [r["prompt"][0]["content"] for r in t + v]
    assert len(set(prompts)) == 50  # distinct, and val never repeats train
    for r in t + v:
        m = re.fullmatch(
            r"What is (\d+) ([+-]) (\d+)\? Answer with the number only\.", r["prompt"][0]["content"]
        )
        a, op, b = int(m[1]), m[2], int(m[3])
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert r["reward_model"]["ground_truth"] == str(a + b if op == "+" else a - b)
        assert int(r["reward_model"]["ground_truth"]) >= 0
        assert r["data_source"] == "arith" and r["prompt"][0]["role"] == "user"
    assert {r["prompt"][0]["content"].split()[3] for r in t} == {"+", "-"}
    # Deterministic for a seed; another seed gives other problems.
    again = D.write_arith_task(tmp_path / "again", 40, 10, max_operand=20, seed=3)
    assert pq.read_table(again[0]).equals(pq.read_table(train))
    other = D.write_arith_task(tmp_path / "other", 40, 10, max_operand=20, seed=4)
    assert not pq.read_table(other[0]).equals(pq.read_table(train))
    # Operands up to 5: 36 additions + 21 subtractions with a >= b = 57 distinct problems.
    full = D.write_arith_task(tmp_path / "full", 50, 7, max_operand=5)
    every = [
        re.search(r"What is (.*)\?", r["prompt"][0]["content"])[1]
        for f in full
        for r in pq.read_table(f).to_pylist()
    ]
    expect = {f"{a} + {b}" for a in range(6) for b in range(6)}
    expect |= {f"{a} - {b}" for a in range(6) for b in range(a + 1)}
    assert len(every) == 57 and set(every) == expect
    with pytest.raises(ValueError, match="give only 57 distinct ones; raise max_operand"):
        D.write_arith_task(tmp_path / "big", 50, 8, max_operand=5)


def test_arith_task_default_config_size(tmp_path):
    # The config's defaults: task_size 512, val a quarter, operands up to 20 (672 problems).
    train, val = D.write_arith_task(tmp_path, 512, 128, max_operand=20, seed=1)
    assert pq.read_metadata(train).num_rows == 512 and pq.read_metadata(val).num_rows == 128


# ---- RLDataset -------------------------------------------------------------------------------
def test_dataset_renders_chat_template(tok, arith_files):
    ds = D.RLDataset(arith_files[0], tok, max_prompt_length=128)
    assert len(ds) == 40 and ds.num_filtered == 0
    ex = ds[0]
    row = pq.read_table(arith_files[0]).to_pylist()[0]
    content = row["prompt"][0]["content"]
    assert ex.raw_prompt == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex.input_ids) == ex.raw_prompt
    assert ex.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ex.ground_truth == row["reward_model"]["ground_truth"]
    assert ex.data_source == "arith" and ex.extra_info == {"split": "train", "index": 0}
    # Both files at once, in order.
    both = D.RLDataset(list(arith_files), tok, max_prompt_length=128)
    assert len(both) == 50 and both[40].extra_info["split"] == "val"


def test_overlong_prompts_filter_or_error(tok, tmp_path):
    path = _write(tmp_path / "p.parquet", [_row("short"), _row("x" * 50), _row("also short")])
    # "<|im_start|>user\n" + content + "<|im_end|>\n<|im_start|>assistant\n": 19 + content
    ds = D.RLDataset(path, tok, max_prompt_length=30)
    assert len(ds) == 2 and ds.num_filtered == 1
    assert [e.index for e in ds.examples] == [0, 1]
    with pytest.raises(
        D.DataError, match=rf"{re.escape(path)}: row 1, column 'prompt': 69 tokens.*=30"
    ):
        D.RLDataset(path, tok, max_prompt_length=30, overlong_prompt="error")
    with pytest.raises(
        D.DataError, match="no prompt left: all 3 are longer than data.max_prompt_length=5"
    ):
        D.RLDataset(path, tok, max_prompt_length=5)


def test_bad_data_errors_name_file_row_column(tok, tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(D.DataError, match=rf"{re.escape(missing)}: no such data file"):
        D.RLDataset(missing, tok, 64)

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(D.DataError, match=rf"{re.escape(str(garbage))}: cannot read as parquet"):
        D.RLDataset(str(garbage), tok, 64)

    no_rm = _write(
        tmp_path / "no_rm.parquet",
        [{"prompt": [{"role": "user", "content": "hi"}], "data_source": "t"}],
    )
    with pytest.raises(D.DataError, match=rf"{re.escape(no_rm)}: missing column 'reward_model'"):
        D.RLDataset(no_rm, tok, 64)

    no_gt = _write(tmp_path / "no_gt.parquet", [{**_row(), "reward_model": {"style": "rule"}}])
    with pytest.raises(
        D.DataError, match=rf"{re.escape(no_gt)}: column 'reward_model' has no field 'ground_truth'"
    ):
        D.RLDataset(no_gt, tok, 64)

    ok = _write(tmp_path / "ok.parquet", [_row()])
    with pytest.raises(D.DataError, match=rf"{re.escape(ok)}: missing column 'question'"):
        D.RLDataset(ok, tok, 64, prompt_key="question")

    empty = _write(tmp_path / "empty.parquet", [_row("fine"), _row("fine too"), _row("   ")])
    with pytest.raises(
        D.DataError, match=rf"{re.escape(empty)}: row 2, column 'prompt': empty prompt"
    ):
        D.RLDataset(empty, tok, 64)
    no_msgs = _write(tmp_path / "no_msgs.parquet", [{**_row(), "prompt": []}, _row()])
    with pytest.raises(
        D.DataError, match=rf"{re.escape(no_msgs)}: row 0, column 'prompt': empty prompt"
    ):
        D.RLDataset(no_msgs, tok, 64)
    # Types checked as the reward declares: a list is no arithmetic answer, null no answer.
    truth = (str, int, float)
    listed = _write(tmp_path / "list.parquet", [{**_row(), "reward_model": {"ground_truth": [1]}}])
    with pytest.raises(D.DataError, match=rf"{re.escape(listed)}: row 0, column 'reward_model.gr"):
        D.RLDataset(listed, tok, 64, ground_truth_types=truth)
    assert len(D.RLDataset(listed, tok, 64)) == 1  # a function that declares nothing: unchecked
    ints = _write(tmp_path / "int.parquet", [{**_row(), "prompt": 3}])
    with pytest.raises(D.DataError, match="row 0, column 'prompt': expected chat messages or"):
        D.RLDataset(ints, tok, 64)


# ---- PromptLoader ----------------------------------------------------------------------------
def test_batch_layout(tok, tmp_path):
    path = _write(tmp_path / "p.parquet", [_row("ab", "1"), _row("abcd", "2"), _row("a", "3")])
    ds = D.RLDataset(path, tok, max_prompt_length=24)
    loader = D.PromptLoader(ds, batch_size=3, shuffle=False)
    batch = loader.next_batch()
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    L = 24
    assert ids.shape == mask.shape == pos.shape == (3, L)
    lengths = [len(e.input_ids) for e in ds.examples]
    assert lengths == [21, 23, 20]
    assert mask.sum(-1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert ids[row, L - n :].tolist() == ds[row].input_ids  # left-padded
        assert (ids[row, : L - n] == tok.pad_token_id).all()
        assert mask[row, : L - n].sum() == 0
        assert pos[row].tolist() == [0] * (L - n) + list(range(n))
    assert list(batch["ground_truth"]) == ["1", "2", "3"]
    assert list(batch["data_source"]) == ["t"] * 3
    assert list(batch["index"]) == [0, 1, 2]
    assert list(batch["uid"]) == ["0.0", "0.1", "0.2"]
    assert batch["raw_prompt"][1] == ds[1].raw_prompt
    assert batch.meta_info["epoch"] == 0


def test_epochs_shuffle_and_cover(tok, arith_files):
    ds = D.RLDataset(arith_files[0], tok, 128)
    loader = D.PromptLoader(ds, batch_size=8, shuffle=True, seed=5)
    assert len(loader) == 5
    epochs = [[int(i) for b in loader for i in b["index"]] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(40))  # each epoch covers everything once
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(40))
    assert loader.epoch == 2
    uids = [u for b in D.PromptLoader(ds, 8, seed=5) for u in b["uid"]]
    assert len(set(uids)) == 40
    # The same seed gives the same order; another seed another.
    assert [int(i) for b in D.PromptLoader(ds, 8, seed=5) for i in b["index"]] == epochs[0]
    assert [int(i) for b in D.PromptLoader(ds, 8, seed=6) for i in b["index"]] != epochs[0]


def test_drop_last(tok, arith_files):
    ds = D.RLDataset(arith_files[0], tok, 128)  # 40 prompts
    dropped = D.PromptLoader(ds, batch_size=12, seed=1)
    assert [len(b) for b in dropped] == [12, 12, 12]
    kept = D.PromptLoader(ds, batch_size=12, seed=1, drop_last=False)
    assert [len(b) for b in kept] == [12, 12, 12, 4]
    with pytest.raises(ValueError, match="fewer than one batch"):
        D.PromptLoader(ds, batch_size=41)


def _snapshot(batch):
    return (
        batch["input_ids"].clone(),
        list(batch["uid"]),
        list(batch["index"]),
        batch.meta_info["epoch"],
    )


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("taken", [3, 5, 7])  # mid-epoch, at the boundary, in epoch 2
def test_exact_resume(tok, arith_files, taken):
    ds = D.RLDataset(arith_files[0], tok, 128)
    reference = D.PromptLoader(ds, batch_size=8, seed=11)
    uninterrupted = [_snapshot(reference.next_batch()) for _ in range(taken + 6)]

    first = D.PromptLoader(ds, batch_size=8, seed=11)
    for _ in range(taken):
        first.next_batch()
    state = first.state_dict()

    resumed = D.PromptLoader(ds, batch_size=8, seed=11)
    resumed.load_state_dict(state)
    after = [_snapshot(resumed.next_batch()) for _ in range(6)]
    for got, want in zip(after, uninterrupted[taken:], strict=True):
        _assert_same(got, want)

    # Iterating by epochs after a resume continues where the run stopped.
    by_iter = D.PromptLoader(ds, batch_size=8, seed=11)
    by_iter.load_state_dict(state)
    rest = [_snapshot(b) for b in by_iter]
    expected_rest = (5 - taken % 5) % 5 or 5  # a finished epoch rolls to the next one
    assert len(rest) == expected_rest
    _assert_same(rest[0], uninterrupted[taken])

    with pytest.raises(ValueError, match="seed 11"):
        D.PromptLoader(ds, batch_size=8, seed=12).load_state_dict(state)


def test_arith_end_to_end_with_reward(tok, arith_files):
    """The task's ground truth is what the arith reward expects."""
    ds = D.RLDataset(arith_files[1], tok, 128)
    batch = D.PromptLoader(ds, batch_size=10, shuffle=False).next_batch()
    for prompt, truth in zip(batch["raw_prompt"], batch["ground_truth"], strict=True):
        a, op, b = re.search(r"What is (\d+) ([+-]) (\d+)", prompt).groups()
        answer = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert REWARDS["arith"](f"{answer}", truth) == 1.0
        assert REWARDS["arith"](f"{answer + 1}", truth) == 0.0
