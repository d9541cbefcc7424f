from collections import Counter

import numpy as np
import pytest

from tests.conftest import tiny_overrides
from trueface.config import load_config
from trueface.data.sampler import BalancedSampler
from trueface.distributed import DistInfo
from trueface.run import planned_steps_per_epoch, resolve_layout
from trueface.train import _step_plan


def _data():
    # a big domain, a tiny one (like DALL-E), both unbalanced inside
    labels = [0] * 80 + [1] * 40 + [0] * 6 + [1] * 3
    domains = ["140k"] * 120 + ["dalle"] * 9
    return labels, domains


def test_domain_class_balance_and_repetitions():
    labels, domains = _data()
    s = BalancedSampler(labels, domains, "domain_class", samples_per_epoch=400, seed=1)
    idx = s.epoch_indices(0)
    cells = Counter((domains[i], labels[i]) for i in idx)
    assert set(cells.values()) == {100}
    plan = {(c.domain, c.label): c for c in s.plan().cells}
    assert plan[("dalle", 1)].repetitions == pytest.approx(100 / 3)
    assert plan[("140k", 0)].draws == 100 and plan[("140k", 0)].size == 80
    # a small cell is repeated evenly (without replacement inside each pass), never skewed
    reps = Counter(i for i in idx if domains[i] == "dalle" and labels[i] == 1)
    assert max(reps.values()) - min(reps.values()) <= 1


@pytest.mark.parametrize("size,draws", [(10, 12), (10, 7), (3, 100), (7, 7)])
def test_an_image_is_drawn_within_two_of_the_others_an_epoch_and_evenly_over_epochs(size, draws):
    # m whole permutations in an epoch's slice (k or k - 1), plus at most the end of one and the
    # start of the next: m to m + 2 draws of each image; epoch 0 starts at a permutation's start
    s = BalancedSampler([0] * size, ["d"] * size, "class", samples_per_epoch=draws, seed=0)
    k, total = draws // size, Counter()
    for epoch in range(size):  # size epochs: size * draws positions, a whole number of permutations
        counts = Counter(s.epoch_indices(epoch).tolist())
        per_image = [counts.get(i, 0) for i in range(size)]
        low, high = (k, k + 1) if epoch == 0 else (k - 1, k + 2)
        assert low <= min(per_image) and max(per_image) <= high and max(per_image) - min(per_image) <= 2, \
            (epoch, per_image)
        total.update(counts)
    assert set(total.values()) == {draws}  # over the stream every image as often as any other


def test_large_cells_are_subsampled_and_covered_over_epochs():
    labels, domains = _data()
    s = BalancedSampler(labels, domains, "domain_class", samples_per_epoch=40, seed=0)
    seen = set()
    for epoch in range(8):
        seen |= {i for i in s.epoch_indices(epoch) if domains[i] == "140k" and labels[i] == 0}
    assert len(seen) == 80  # 10 draws/epoch from 80 images: all seen within 8 epochs


@pytest.mark.parametrize("total", [120, 121, 122])
def test_ranks_are_disjoint_and_cover_the_epoch(total):
    """Over 3 ranks: every rank gets the same count (DDP needs equal batch counts), the slots hold
    the whole epoch once, and an epoch that does not divide pads its last slots by wrapping
    around to the epoch's first samples."""
    labels, domains = _data()
    world = 3
    shards = []
    for rank in range(world):
        s = BalancedSampler(labels, domains, "domain_class", samples_per_epoch=total, rank=rank, world_size=world, seed=5)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == -(-total // world)
    full = BalancedSampler(labels, domains, "domain_class", samples_per_epoch=total, seed=5).epoch_indices(2)
    # positions r, r+W, ... : disjoint slots, and together exactly the epoch
    interleaved = np.array(shards).T.reshape(-1)
    assert len(full) == total and np.array_equal(interleaved[:total], full)
    assert np.array_equal(interleaved[total:], full[:len(interleaved) - total])
    for shard in shards:  # each rank still sees every domain and class
        assert len({(domains[i], labels[i]) for i in shard}) == 4


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    labels, domains = _data()
    a = BalancedSampler(labels, domains, "class", seed=3)
    b = BalancedSampler(labels, domains, "class", seed=3)
    assert np.array_equal(a.epoch_indices(4), b.epoch_indices(4))
    assert not np.array_equal(a.epoch_indices(4), a.epoch_indices(5))
    counts = Counter(labels[i] for i in a.epoch_indices(0))
    assert counts[0] == counts[1]


def test_none_mode_is_a_permutation():
    labels, domains = _data()
    s = BalancedSampler(labels, domains, "none", seed=0)
    assert sorted(s.epoch_indices(1).tolist()) == list(range(len(labels)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampling mode"):
        BalancedSampler([0], ["a"], "domain")
    with pytest.raises(ValueError, match="rank 2"):
        BalancedSampler([0], ["a"], rank=2, world_size=2)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_an_epoch_has_the_same_steps_on_any_number_of_workers(tiny_root, tmp_path, accum_steps):
    """Steps are the epoch's whole global batches: 10 draws in batches of 4 are 2 steps on 1, 2 or 4
    workers (counted on a rank's padded share, 4 workers made it 3: a step of repeated images, and
    the LR and EMA schedules moved with the worker count). Every rank's share holds those steps."""
    for workers in (1, 2, 4):
        cfg = load_config("demo", [*tiny_overrides(tiny_root, tmp_path), f"stage1.samples_per_epoch={10 * accum_steps}",
                                   f"stage1.batch_size={4 * accum_steps}", f"stage1.accum_steps={accum_steps}",
                                   f"scaling.num_workers={workers}", "stage1.mixup_alpha=0"])
        cfg, layout = resolve_layout(cfg)
        st = cfg.stage1
        train = layout.gather(st.domains, "train")
        for rank in range(workers):
            sampler = BalancedSampler([s.label for s in train], [s.domain for s in train], st.balance,
                                      st.samples_per_epoch, rank, workers)
            plan = _step_plan(st, "stage1", sampler.epoch_size, DistInfo(rank, workers))
            assert plan.steps_per_epoch == 2, (workers, rank)
            assert len(sampler) >= plan.steps_per_epoch * accum_steps * plan.micro
        assert planned_steps_per_epoch(cfg, layout, 1) == 2
