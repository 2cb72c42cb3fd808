"""No code outside xtrain/comm calls torch.distributed's collectives directly.

Strategies go through ``xtrain.comm`` so that ``comm=xtrain|torch`` swaps
every collective and the ledger sees them all. Process-group management
(init_process_group, new_group, get_rank, ...) is allowed; xtrain/spawn.py
(the harness) is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "xtrain"
EXEMPT = {ROOT / "spawn.py"}

COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "all_gather_object", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_single", "broadcast", "broadcast_object_list", "reduce", "gather", "gather_object",
    "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list",
}
MODULES = {"torch.distributed", "torch.distributed.distributed_c10d", "torch.distributed._functional_collectives"}


def _direct_calls(path: Path) -> list[str]:
    """``dist.all_reduce(...)``-style calls, through any alias of torch.distributed."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases, imported = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(f)}(")
        elif isinstance(f, ast.Name) and f.id in imported:
            found.append(f"{path.name}:{node.lineno}: {f.id}(")
    return found


def test_no_strategy_calls_torch_collectives_directly():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if (ROOT / "comm") in path.parents or path in EXEMPT:
            continue
        offenders += [f"{path.parent.name}/{hit}" for hit in _direct_calls(path)]
    assert not offenders, "call xtrain.comm instead:\n" + "\n".join(offenders)


def test_the_scan_catches_aliases(tmp_path):
    bad = tmp_path / "probe.py"
    src = (
        "import torch.distributed as dist\nimport torch\nfrom torch.distributed import all_gather as ag\n"
        "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nag(a, b)\ndist.get_rank()\ndist.new_group([0])\n"
    )
    bad.write_text(src)
    found = _direct_calls(bad)
    assert len(found) == 3, found
