"""all_gather (uneven rows), scatter and broadcast of a Batch over gloo, 2 ranks."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

from tandem_core.protocol import Batch  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
rows = 2 + rank  # 2 and 3 rows: uneven on purpose
mine = Batch.from_dict({"x": torch.full((rows, 2), rank)}, {"who": [f"r{rank}"] * rows})
gathered = mine.all_gather()
assert gathered["x"][:, 0].tolist() == [0, 0, 1, 1, 1], gathered["x"]
assert gathered["who"].tolist() == ["r0", "r0", "r1", "r1", "r1"]

source = Batch.from_dict({"x": torch.arange(4).view(4, 1)}, {"i": list(range(4))})
piece = source.scatter()
assert piece["x"].view(-1).tolist() == [2 * rank, 2 * rank + 1], piece["x"]
assert piece["i"].tolist() == [2 * rank, 2 * rank + 1]

b = Batch.from_dict({"x": torch.zeros(1)}, meta_info={"tag": f"from-{rank}"})
got = b.broadcast()
assert got.meta_info["tag"] == "from-0"
sizes = [None, None]
dist.all_gather_object(sizes, len(piece))
write_result({"gathered": len(gathered), "scattered": sizes, "broadcast": got.meta_info["tag"]})
dist.destroy_process_group()
exit_now()
