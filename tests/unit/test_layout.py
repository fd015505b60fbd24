import pytest

from layerpar.parallel.layout import BranchLayout

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n,w", [(1, 1), (6, 1), (6, 2), (6, 3), (6, 4), (8, 3), (16, 16), (7, 2)])
def test_layout_covers_every_branch_once_in_contiguous_balanced_blocks(n, w):
    layout = BranchLayout(n, w)
    owned = [list(layout.owned(r)) for r in range(w)]
    assert [b for block in owned for b in block] == list(range(n))
    sizes = [len(block) for block in owned]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)
    assert all(layout.owner(b) == r for r, block in enumerate(owned) for b in block)


def test_participants_are_the_owners_of_the_prefix():
    layout = BranchLayout(6, 3)  # [0,1] [2,3] [4,5]
    assert [layout.participants(k) for k in range(1, 7)] == [1, 1, 2, 2, 3, 3]


def test_layout_prints_and_refuses_bad_values():
    assert str(BranchLayout(8, 3)) == "branches=8 workers=3 owns=[[0,1,2],[3,4,5],[6,7]]"
    assert BranchLayout(8, 4).describe(2) == "branches=8 workers=4 rank=2 owns=[4, 5]"
    with pytest.raises(ValueError, match=r"num_workers \(9\) must be in 1..num_branches \(8\)"):
        BranchLayout(8, 9)
    with pytest.raises(ValueError, match="num_workers"):
        BranchLayout(8, 0)
    with pytest.raises(ValueError, match="num_branches"):
        BranchLayout(8, 2).participants(9)


def test_cpu_ranks_get_disjoint_cores_or_none():
    from layerpar.parallel.affinity import cores_for

    cores = [0, 1, 2, 3]
    assert [cores_for(r, 2, 2, cores) for r in range(2)] == [[0, 1], [2, 3]]
    assert [cores_for(r, 4, 1, cores) for r in range(4)] == [[0], [1], [2], [3]]
    assert cores_for(0, 3, 2, cores) == []  # 6 threads on 4 cores: leave placement to the OS
    assert cores_for(0, 2, 1, [5, 9]) == [5] and cores_for(1, 2, 1, [5, 9]) == [9]  # a cgroup's set
