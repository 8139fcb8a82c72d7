"""lmforge.training.throughput: the one peak measurement that the train stage and `lmforge bench` divide by.

A rank that measured the peak alone at start-up (its peer still importing) and multiplied it by the
world size would overstate it, and MFU could exceed 1. peak_flops has every rank measure at the same
time (a barrier before each try), sums the ranks and keeps the best try.
These tests drive it with two real gloo ranks and a stand-in for the matmul timing, so what is checked
is the protocol, not this machine's speed. (That a real run's MFU stays at or below 1 is checked on the
train stage's own log in test_bench.)
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from lmforge.training.throughput import PEAK_TRIES, peak_flops

# each rank's measured rate, try by try: the best sum over ranks (15, 70, 21) is the second try's
RATES = [[10.0, 30.0, 20.0], [5.0, 40.0, 1.0]]
LATE_RANK, LATE_SECONDS, TRY_SECONDS = 1, 1.5, 0.3


def _rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from lmforge.training import throughput

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(RATES))
    spans, rates = [], iter(RATES[rank])

    def timed_matmuls(device, size=None, repeats=8):
        start = time.time()
        time.sleep(TRY_SECONDS)
        spans.append((start, time.time()))
        return next(rates)

    throughput.measure_matmul_flops = timed_matmuls
    if rank == LATE_RANK:
        time.sleep(LATE_SECONDS)  # still importing, or building its model
    peak = throughput.peak_flops(torch.device("cpu"), len(RATES))
    Path(out, f"{rank}.json").write_text(json.dumps({"peak": peak, "spans": spans}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("peak")
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=_rank, args=(r, str(tmp / "store"), str(tmp))) for r in range(len(RATES))]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == [0] * len(RATES)
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(len(RATES))]


def test_the_peak_is_the_best_try_of_the_ranks_summed(two_ranks):
    best = max(sum(rates) for rates in zip(*RATES, strict=True))
    assert [r["peak"] for r in two_ranks] == [best] * len(RATES)  # every rank divides by the same peak


def test_every_rank_measures_at_the_same_time(two_ranks):
    # the late rank was still busy when the other arrived: every try waited for it, so in every try the
    # ranks' matmuls ran together, as training's do, and neither measured alone
    assert all(len(r["spans"]) == PEAK_TRIES for r in two_ranks)
    for spans in zip(*(r["spans"] for r in two_ranks), strict=True):
        assert max(start for start, _ in spans) < min(end for _, end in spans), spans


def test_a_single_process_keeps_its_best_try(monkeypatch):
    from lmforge.training import throughput

    tries = iter(RATES[0])  # one rank's rates, try by try; no collective without a process group
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, repeats: next(tries))
    assert peak_flops(torch.device("cpu")) == max(RATES[0][:PEAK_TRIES])
