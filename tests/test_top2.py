"""kernels.top2.top2_torch (the CPU fast pass) against the float64 reference: odd shapes, exact ties (the
first index of the maximum wins, whatever the tiling), the merge across column blocks, the self column."""
import numpy as np
import pytest
import torch

from unspeakable.kernels.top2 import top2_reference, top2_torch


def _instance(B, V, d, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    # multiples of 1/8 below 32: products and sums of up to 64 of them are exact in float32, so the float32
    # pass and the float64 reference see the same scores, exact ties included
    keys = (torch.randn(V, d, generator=g, dtype=torch.float64) * 8).round() / 8
    queries = keys[torch.randperm(V, generator=g)[:B]].clone() if B <= V else torch.randn(B, d, dtype=torch.float64)
    if ties:  # duplicate columns far apart: equal scores in different column blocks
        keys[V - 1] = keys[1]
        keys[V // 2] = keys[1]
    return queries, keys


@pytest.mark.parametrize("B,V,d,block_rows,block_cols", [
    (1, 2, 1, 1, 1),          # the smallest problem
    (7, 37, 5, 3, 4),         # odd shapes, many blocks
    (64, 129, 33, 16, 32),    # a column block of one
    (130, 300, 8, 1024, 7),   # many small column blocks: the merge across blocks decides
])
@pytest.mark.parametrize("ties", [False, True])
def test_top2_torch_equals_reference(B, V, d, block_rows, block_cols, ties):
    q, k = _instance(B, V, d, seed=B * 1000 + V, ties=ties)
    self_index = torch.arange(B, dtype=torch.int64) % V
    bias = (torch.linspace(-1, 1, V, dtype=torch.float64) * 4).round() / 4
    ref = top2_reference(q, k, self_index, bias=bias)
    got = top2_torch(q.float(), k.float(), self_index, bias=bias.float(), block_rows=block_rows,
                     block_cols=block_cols)
    assert torch.equal(got.best_idx, ref.best_idx)
    assert torch.equal(got.second_idx, ref.second_idx)
    assert torch.equal(got.best_val.double(), ref.best_val) and torch.equal(got.self_val.double(), ref.self_val)


def test_exact_ties_keep_the_first_index_in_every_tiling():
    V, d = 50, 4
    keys = torch.zeros(V, d)
    keys[[7, 23, 41]] = torch.tensor([1.0, 2.0, 0.0, 0.0])  # three identical best columns
    q = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    for block_cols in (1, 5, 8, 24, 64):
        r = top2_torch(q, keys, torch.tensor([-1]), block_cols=block_cols)
        assert int(r.best_idx[0]) == 7 and int(r.second_idx[0]) == 23, block_cols
    r = top2_torch(q, keys, torch.tensor([7]), block_cols=5)  # self excluded: the next two
    assert int(r.best_idx[0]) == 23 and int(r.second_idx[0]) == 41
    assert float(r.self_val[0]) == 3.0


def test_two_tokens_have_no_second_competitor():
    keys = torch.tensor([[1.0], [2.0]])
    r = top2_torch(keys, keys, torch.tensor([0, 1]))
    assert r.best_idx.tolist() == [1, 0] and r.second_idx.tolist() == [-1, -1]
    assert np.isneginf(r.second_val.numpy()).all()


def test_top2_exact_second_index_is_exact_when_second_and_third_are_near_tied():
    """Issue 8: the second index too must equal the float64 reference when the 2nd and 3rd competitors are
    closer than the float32 pass can tell apart."""
    from unspeakable.kernels.screen import top2_exact

    rng = np.random.default_rng(4)
    V, d = 300, 16
    keys = rng.standard_normal((V, d))
    q = rng.standard_normal((5, d))
    for i in range(5):  # columns 10+i (best), 100+i and 200+i (2nd / 3rd, 1e-12 apart, order by index reversed)
        keys[10 + i] = 30.0 * q[i] / np.linalg.norm(q[i])
        keys[200 + i] = 20.0 * q[i] / np.linalg.norm(q[i])
        keys[100 + i] = keys[200 + i] * (1 - 1e-12)
    kt, qt = torch.from_numpy(keys), torch.from_numpy(q)
    ref = top2_reference(qt, kt, torch.full((5,), -1))
    got, redo = top2_exact(qt, kt, torch.full((5,), -1))
    assert torch.equal(got.best_idx, ref.best_idx) and torch.equal(got.second_idx, ref.second_idx)
    assert got.second_idx.tolist() == [200 + i for i in range(5)] and redo == 5
