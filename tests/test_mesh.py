import pytest
import torch

from xtrain.comm import SOLO, get_comm
from xtrain.mesh import AXES, Mesh, MeshError, resolve_degrees
from xtrain.spawn import run_on_ranks


def test_dp_is_inferred_and_degrees_must_tile_the_world():
    assert resolve_degrees(8, tp=2) == {"pp": 1, "dp": 4, "cp": 1, "ep": 1, "tp": 2}
    assert resolve_degrees(8, pp=2, tp=2, dp=-1)["dp"] == 2
    with pytest.raises(MeshError, match="cannot be inferred"):
        resolve_degrees(6, tp=4)
    with pytest.raises(MeshError, match="do not match world size 8"):
        resolve_degrees(8, dp=2, tp=2)
    with pytest.raises(MeshError, match="invalid"):
        resolve_degrees(4, tp=0)
    with pytest.raises(MeshError, match="unknown mesh axes"):
        resolve_degrees(4, xp=2)


def test_single_process_mesh_has_solo_groups():
    mesh = Mesh.build(1, 0)
    assert all(mesh.group(a) is SOLO for a in AXES)
    assert mesh.coords == dict.fromkeys(AXES, 0)


def _mesh_facts(rank, world):
    mesh = Mesh.build(world, rank, pp=2, tp=2)  # dp = 2 inferred: grid (pp=2, dp=2, tp=2)
    comm = get_comm("torch")
    sums = {}
    for axes in ("pp", "dp", "tp", ("dp", "cp")):
        t = torch.tensor([float(rank)])
        comm.all_reduce(t, group=mesh.group(axes))
        sums[str(axes)] = t.item()
    return {
        "coords": mesh.coords,
        "tp": mesh.ranks("tp"),
        "dp": mesh.ranks("dp"),
        "pp": mesh.ranks("pp"),
        "dp_neighbours": mesh.neighbours("dp"),
        "pp_neighbours": mesh.neighbours("pp"),
        "pp_line": (mesh.prev_rank("pp"), mesh.next_rank("pp"), mesh.is_first("pp"), mesh.is_last("pp")),
        "pp_ends": mesh.role_ranks("pp_ends"),
        "sums": sums,
        "cp_is_solo": mesh.group("cp") is SOLO,
        "labels": sorted({r[1] for r in comm.ledger.summary_rows()}),
    }


def test_eight_rank_grid_coordinates_groups_and_neighbours():
    facts = run_on_ranks(_mesh_facts, 8, timeout=120)
    for rank, f in enumerate(facts):
        pp, dp, tp = rank // 4, (rank // 2) % 2, rank % 2
        assert f["coords"] == {"pp": pp, "dp": dp, "cp": 0, "ep": 0, "tp": tp}
        assert f["tp"] == [rank - tp, rank - tp + 1]
        assert f["dp"] == [pp * 4 + tp, pp * 4 + 2 + tp]
        assert f["pp"] == [dp * 2 + tp, 4 + dp * 2 + tp]
        other_dp = f["dp"][1 - dp]
        assert f["dp_neighbours"] == (other_dp, other_dp)
        assert f["sums"]["tp"] == sum(f["tp"]) and f["sums"]["dp"] == sum(f["dp"]) and f["sums"]["pp"] == sum(f["pp"])
        assert f["sums"]["('dp', 'cp')"] == sum(f["dp"])  # cp=1: the same ranks as dp
        assert f["cp_is_solo"]
        assert f["labels"] == ["dp", "pp", "tp"]
        # a pipeline line has ends: no wrap-around, unlike the ring neighbours
        other_pp = f["pp"][1 - pp]
        assert f["pp_line"] == ((None, other_pp, True, False) if pp == 0 else (other_pp, None, False, True))
        assert f["pp_ends"] == f["pp"]  # pp=2: the first and last stage are the whole line


def _pp_roles(rank, world):
    mesh = Mesh.build(world, rank, pp=4)
    comm = get_comm("torch")
    t = torch.tensor([float(rank)])
    member = rank in mesh.role_ranks("pp_ends")
    if member:
        comm.all_reduce(t, group=mesh.role_group("pp_ends"))
    m = torch.tensor([float(rank)])
    comm.all_reduce(m, group=mesh.role_group("pp_mirror"))
    return mesh.prev_rank("pp"), mesh.next_rank("pp"), mesh.role_ranks("pp_ends"), member, t.item(), m.item()


def test_pipeline_roles_on_a_four_stage_line():
    facts = run_on_ranks(_pp_roles, 4, timeout=120)
    assert [f[:2] for f in facts] == [(None, 1), (0, 2), (1, 3), (2, None)]
    assert all(f[2] == [0, 3] for f in facts)
    assert [f[3] for f in facts] == [True, False, False, True]
    assert facts[0][4] == facts[3][4] == 3.0  # the role group sums over ranks 0 and 3 only
    assert [f[5] for f in facts] == [3.0, 3.0, 3.0, 3.0]  # mirror pairs (0, 3) and (1, 2)
