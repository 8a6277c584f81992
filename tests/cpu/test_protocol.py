"""The batch protocol: every operation, including the error cases."""

import numpy as np
import pytest
import torch

from tandem_core.protocol import Batch


def make(n=6, offset=0):
    ids = torch.arange(n * 3).view(n, 3) + offset
    return Batch.from_dict(
        {"input_ids": ids, "mask": torch.ones(n, 3, dtype=torch.long)},
        {"gt": [str(i + offset) for i in range(n)]},
        {"temperature": 1.0},
    )


def test_from_dict_checks_batch_size():
    with pytest.raises(ValueError, match="batch size"):
        Batch.from_dict({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="non-tensor field 'gt'"):
        Batch.from_dict({"a": torch.zeros(2, 1)}, {"gt": ["x"]})


def test_select_and_getitem():
    b = make()
    s = b.select(["input_ids"], ["gt"])
    assert s.keys() == ["input_ids", "gt"] and len(s) == 6
    assert s.meta_info == {"temperature": 1.0}
    with pytest.raises(KeyError, match="no field 'nope'"):
        b["nope"]


def test_index_slice_list_mask():
    b = make()
    assert b.index(slice(1, 3))["gt"].tolist() == ["1", "2"]
    assert b.index([5, 0])["input_ids"][:, 0].tolist() == [15, 0]
    mask = torch.tensor([True, False, True, False, False, False])
    assert b.index(mask)["gt"].tolist() == ["0", "2"]


def test_union_merges_and_detects_conflicts():
    a = make().select(["input_ids"], [])
    b = make().select(["mask"], ["gt"])
    u = a.union(b)
    assert sorted(u.keys()) == ["gt", "input_ids", "mask"]
    assert a.union(make().select(["input_ids"], [])).keys() == ["input_ids"]  # equal: fine
    with pytest.raises(ValueError, match="conflict on tensor field 'input_ids'"):
        a.union(make(offset=1).select(["input_ids"], []))
    with pytest.raises(ValueError, match="conflict on non-tensor field 'gt'"):
        make().union(make(offset=1).select([], ["gt"]))
    other = make()
    other.meta_info["temperature"] = 0.5
    with pytest.raises(ValueError, match="meta_info 'temperature'"):
        make().union(other)


def test_concat_split_chunk():
    a, b = make(4), make(2, offset=100)
    c = Batch.concat([a, b])
    assert len(c) == 6 and c["gt"].tolist()[-1] == "101"
    parts = c.split(4)
    assert [len(p) for p in parts] == [4, 2]
    assert torch.equal(Batch.concat(parts)["input_ids"], c["input_ids"])
    assert [len(p) for p in c.chunk(3)] == [2, 2, 2]
    with pytest.raises(ValueError, match="cannot chunk a batch of 6 rows into 4"):
        c.chunk(4)
    with pytest.raises(ValueError, match="different fields"):
        Batch.concat([a, a.select(["input_ids"], ["gt"])])


def test_repeat_interleaved_and_tiled():
    b = make(2)
    assert b.repeat(3)["gt"].tolist() == ["0", "0", "0", "1", "1", "1"]
    assert b.repeat(2, interleave=False)["gt"].tolist() == ["0", "1", "0", "1"]
    with pytest.raises(ValueError):
        b.repeat(0)


def test_pad_to_divisor_and_unpad():
    b = make(5)
    padded, pad = b.pad_to_divisor(4)
    assert pad == 3 and len(padded) == 8
    assert padded["gt"].tolist()[5:] == ["0", "1", "2"]
    assert torch.equal(padded.unpad(pad)["input_ids"], b["input_ids"])
    same, zero = b.pad_to_divisor(5)
    assert zero == 0 and same is b


def test_setitem_checks_rows():
    b = make(3)
    b["extra"] = np.array(["a", "b", "c"], dtype=object)
    b["t"] = torch.zeros(3)
    assert "extra" in b and "t" in b
    with pytest.raises(ValueError, match="field 'bad' has 2 rows"):
        b["bad"] = ["x", "y"]


def test_collectives_over_gloo(torchrun):
    out = torchrun("protocol_collectives.py", 2)
    assert out == {"gathered": 5, "scattered": [2, 2], "broadcast": "from-0"}


def test_index_empty_list_gives_empty_batch():
    b = make()
    empty = b.index([])
    assert len(empty) == 0 and empty["gt"].tolist() == []
    assert len(Batch.concat([empty, b.index([1])])) == 1
