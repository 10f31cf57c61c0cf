"""The shared loader: seeded epoch orders, per-batch keys, disjoint rank shares, DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest

import mpdsl
from mpdsl.sampling.batch import make_batch
from mpdsl.sampling.loader import SampleLoader, SamplingError, batch_key

GRAPH = mpdsl.Graph(np.zeros((2, 0), dtype=np.int64), 100, node_data={"x": np.arange(100.0)[:, None]})
NO_EDGES = np.zeros((2, 0), dtype=np.int64)


def _sample(units, key):
    keys = {"node_key": np.full(len(units), key)}
    return make_batch(GRAPH, units, NO_EDGES, NO_EDGES[0], len(units), node_extra=keys)


def _epoch(loader) -> list[tuple[list[int], int]]:
    return [(b.n_id.tolist(), int(b["node_key"][0])) for b in loader]


def test_batches_cover_the_units_once_per_epoch_in_a_seeded_order():
    loader = SampleLoader(np.arange(10), 3, _sample, shuffle=True, seed=7)
    first, second = _epoch(loader), _epoch(loader)
    assert [len(units) for units, _ in first] == [3, 3, 3, 1]
    assert sorted(unit for units, _ in first for unit in units) == list(range(10))
    assert first != second  # a new order and new keys each epoch
    loader.set_epoch(0)
    assert _epoch(loader) == first
    assert _epoch(SampleLoader(np.arange(10), 3, _sample, shuffle=True, seed=7)) == first
    assert first[2][1] == batch_key(7, 0, 2)


def test_without_shuffle_the_order_is_the_given_one():
    loader = SampleLoader(np.array([5, 1, 9]), 2, _sample, drop_last=True)
    assert _epoch(loader) == [([5, 1], batch_key(0, 0, 0))]


def test_ranks_take_disjoint_shares_of_the_same_global_batches():
    whole = _epoch(SampleLoader(np.arange(23), 4, _sample, shuffle=True, seed=3))
    shares = [_epoch(SampleLoader(np.arange(23), 4, _sample, shuffle=True, seed=3, rank=r, world_size=2))
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 3  # 6 global batches: the odd one out is dropped
    assert shares[0] == whole[0:6:2] and shares[1] == whole[1:6:2]


def test_worker_processes_give_the_same_batches():
    serial = _epoch(SampleLoader(np.arange(40), 6, _sample, shuffle=True, seed=1))
    assert _epoch(SampleLoader(np.arange(40), 6, _sample, shuffle=True, seed=1, num_workers=2)) == serial


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"world_size": 0}, "world_size must be a positive integer"),
    ({"rank": 2, "world_size": 2}, r"rank must be an integer in \[0, world_size=2\)"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"collate_fn": list}, "collate_fn is set by the loader itself"),
    ({"batch_size": 8, "world_size": 3}, "2 batches cannot be shared by 3 ranks"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    options = {"batch_size": 4, **kwargs}
    with pytest.raises(SamplingError, match=message):
        SampleLoader(np.arange(10), options.pop("batch_size"), _sample, **options)
