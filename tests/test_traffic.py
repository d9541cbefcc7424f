"""``trueface.bench.traffic``: each rule of the count on ops whose bytes are known by hand."""

from __future__ import annotations

import json
import re

import pytest
import torch

from trueface.bench.traffic import count_traffic, distinct_bytes

X = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
NB = X.nbytes
IDX = torch.tensor([1, 3])
TWO = 2 * NB // 10  # two of the ten images

CASES = {  # what runs, the bytes it reads and writes, the ops that move data
    "an op reads its input, writes its output": (lambda: X + 1, 2 * NB, 1),
    "in place: read and written": (lambda: X.clone().add_(1), 2 * NB + 2 * NB, 2),
    "views move nothing": (lambda: X.view(-1).unsqueeze(0).transpose(0, 1)[2:], 0, 0),
    "an allocation moves nothing": (lambda: torch.empty_like(X), 0, 0),
    "a gather reads what it picks": (lambda: X.index_select(0, IDX), 2 * TWO + IDX.nbytes, 1),
    "a broadcast dimension counts once": (lambda: X * torch.ones(1, 3, 1, 1).expand(10, 3, 8, 8), 12 + 2 * NB + 12, 2),
    "out= is only written": (lambda: torch.mul(X, 2, out=torch.empty_like(X)), 2 * NB, 1),
    "a copy only writes its target": (lambda: torch.empty_like(X).copy_(X), 2 * NB, 1),
    "index_copy_ writes what it copies": (lambda: torch.empty_like(X).index_copy_(0, IDX, X[:2]),
                                          2 * TWO + IDX.nbytes, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_counts_the_bytes_worked_out_by_hand(case):
    fn, nbytes, ops = CASES[case]
    traffic = count_traffic(fn)
    assert (traffic.bytes, traffic.ops) == (nbytes, ops)


def test_the_counted_code_runs_as_without_the_count():
    out = []
    count_traffic(lambda: out.append(torch.nn.functional.avg_pool2d(X, 2) * 3))
    assert torch.equal(out[0], torch.nn.functional.avg_pool2d(X, 2) * 3)


def test_distinct_bytes_counts_a_broadcast_dimension_once():
    assert distinct_bytes(X) == NB
    assert distinct_bytes(torch.zeros(3, 1).expand(3, 1000)) == 3 * 4
    assert distinct_bytes(X[:, :1]) == NB // 3  # a slice: its own elements, not its storage's


def test_the_traffic_part_counts_each_stage_with_the_gpus_jpeg(tmp_path, monkeypatch):
    from jobs import benchmark
    from trueface.bench import augment_traffic, gpu

    jpeg_calls = []
    real = augment_traffic.jpeg_tensor
    monkeypatch.setattr(augment_traffic, "jpeg_tensor", lambda x, q: jpeg_calls.append(len(x)) or real(x, q))
    assert benchmark.main(["traffic", "--quick", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench-traffic" / "bench.json").read_text())["rows"]
    assert [r["what"] for r in rows] == ["Stage I augmentation memory traffic", "Stage II augmentation memory traffic"]
    for row, size in zip(rows, gpu.CPU_QUICK.values(), strict=True):
        assert row["unit"] == "GB a batch"
        # at least the uint8 batch read and the float batch written: float16 (a CUDA run's) counted
        # against float32 on the same batches, the float32 count the larger
        pixels = size.batch * 3 * size.image**2
        assert row["project"] * 1e9 >= pixels * (1 + 2) and row["reference"] * 1e9 >= pixels * (1 + 4)
        assert row["project"] < 0.9 * row["reference"]
        # fewer bytes is better: the ratio reads how many times fewer float16 moves, above 1, as
        # every ratio reads "how many times better" (not fp16 / fp32 = 0.73x, "worse")
        assert row["lower_is_better"] is True
        assert row["ratio"] == pytest.approx(row["reference"] / row["project"]) and row["ratio"] > 1.1
        # the note's per-image figure agrees
        per_image = float(re.search(r"([\d,.]+) MB an image", row["note"]).group(1).replace(",", ""))
        assert per_image * size.batch / 1e3 == pytest.approx(row["project"], rel=0.01)
    assert jpeg_calls  # the tensor JPEG a GPU runs, not the CPU's libjpeg
