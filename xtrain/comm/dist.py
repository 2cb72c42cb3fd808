"""torch.distributed's collectives, hand-written: a drop-in module.

    import xtrain.comm.dist as dist      # instead of: import torch.distributed as dist

turns a torch.distributed script onto xtrain's hand-written collectives
without other changes. Every collective has torch's name, argument names,
defaults and return values (``group=None`` is the world; ``src``/``dst`` are
global ranks, ``group_src``/``group_dst`` ranks in the group; ``gather`` and
``scatter`` default to global rank 0, ``broadcast`` and ``reduce`` need one
of the two, as in torch); a rank calling one on a group it does not belong
to gets torch's warning and ``None`` (``-1`` from ``recv``) without any
communication. ``async_op=True`` returns a handle with ``wait(timeout)``,
``is_completed()`` and ``get_future()`` (a ``torch.futures.Future``
completed by the comm's own thread, so it can serve a DDP comm hook).

Everything else a script uses (``init_process_group``, ``get_rank``,
``new_group``, ``ReduceOp``, ``group.WORLD``, ``Backend``, stores, ...) is
torch.distributed's own, re-exported. ``P2POp`` is xtrain's (torch's
refuses any ``op`` but its own functions); ``batch_isend_irecv`` takes both.

The calls go to one module-wide Comm (``get_default_comm()``, a hand-written
``XtrainComm`` unless ``use("torch")`` or ``use(comm)`` says otherwise) whose
ledger records each call under the function's name and the group's label:
``get_ledger()``; ``ledger_table()`` gathers every rank's ledger into one
table and ``format_ledger_table`` prints it. Strategies keep using
``xtrain.comm.get_comm``.
"""

from __future__ import annotations

import torch.distributed as _td
from torch.distributed import (  # noqa: F401 - re-exported for scripts
    Backend,
    DistBackendError,
    DistError,
    DistNetworkError,
    DistStoreError,
    FileStore,
    GroupMember,
    HashStore,
    PrefixStore,
    ProcessGroup,
    ReduceOp,
    Store,
    TCPStore,
    destroy_process_group,
    get_backend,
    get_global_rank,
    get_group_rank,
    get_process_group_ranks,
    get_rank,
    get_world_size,
    group,
    init_process_group,
    is_available,
    is_gloo_available,
    is_initialized,
    is_mpi_available,
    is_nccl_available,
    is_torchelastic_launched,
    new_group,
    new_subgroups,
    new_subgroups_by_enumeration,
)

from xtrain.comm.base import CollectiveTimeout, Comm, CommError, P2POp, Work
from xtrain.comm.ledger import Ledger, format_table

_comm: Comm | None = None

# torch.distributed collectives this module does not provide (deprecated in torch):
# reaching them through the fallback would silently bypass the hand-written ones.
_NOT_PROVIDED = {"all_reduce_coalesced", "all_gather_coalesced", "broadcast_multigpu", "all_reduce_multigpu",
                 "reduce_multigpu", "all_gather_multigpu", "reduce_scatter_multigpu"}


def get_default_comm() -> Comm:
    """The Comm this module's functions call (created on first use: hand-written)."""
    global _comm
    if _comm is None:
        from xtrain.comm.xtrain_comm import XtrainComm

        _comm = XtrainComm()
    return _comm


def use(comm) -> Comm:
    """Route this module's functions to ``comm``: a Comm, or ``"xtrain"`` / ``"torch"``."""
    global _comm
    if isinstance(comm, str):
        from xtrain.comm import get_comm

        comm = get_comm(comm)
    if not isinstance(comm, Comm):
        raise TypeError(f"use: expected a Comm or 'xtrain'/'torch', got {comm!r}")
    _comm = comm
    return comm


def get_ledger() -> Ledger:
    """The ledger of this module's calls (keys: function name, group label)."""
    return get_default_comm().ledger


def ledger_table(group=None) -> list[dict]:
    """Every rank's ledger in one table (a collective over ``group``): per op and
    group, calls, bytes sent and received and times by global rank."""
    return get_default_comm().ledger_table(group=group)


def format_ledger_table(rows=None) -> str:
    """``ledger_table()``'s rows as text (gathers them first when not given)."""
    return format_table(ledger_table() if rows is None else rows)


# ---- collectives, with torch.distributed's signatures ------------------------------------


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
    return get_default_comm().all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
    return get_default_comm().broadcast(tensor, src=src, group=group, async_op=async_op, group_src=group_src)


def reduce(tensor, dst=None, op=ReduceOp.SUM, group=None, async_op=False, group_dst=None):
    return get_default_comm().reduce(tensor, dst=dst, op=op, group=group, async_op=async_op, group_dst=group_dst)


def all_gather(tensor_list, tensor, group=None, async_op=False):
    return get_default_comm().all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    return get_default_comm().all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def all_gather_single(output_tensor, input_tensor, group=None, async_op=False):
    return get_default_comm().all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False):
    return get_default_comm().reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)


def reduce_scatter_tensor(output, input, op=ReduceOp.SUM, group=None, async_op=False):
    return get_default_comm().reduce_scatter_tensor(output, input, op=op, group=group, async_op=async_op)


def reduce_scatter_single(output, input, op=ReduceOp.SUM, group=None, async_op=False):
    return get_default_comm().reduce_scatter_single(output, input, op=op, group=group, async_op=async_op)


def gather(tensor, gather_list=None, dst=None, group=None, async_op=False, group_dst=None):
    return get_default_comm().gather(tensor, gather_list, dst=dst, group=group, async_op=async_op, group_dst=group_dst)


def scatter(tensor, scatter_list=None, src=None, group=None, async_op=False, group_src=None):
    return get_default_comm().scatter(tensor, scatter_list, src=src, group=group, async_op=async_op, group_src=group_src)


def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
    return get_default_comm().all_to_all_single(
        output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
    )


def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
    return get_default_comm().all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


def barrier(group=None, async_op=False, device_ids=None, timeout=None):
    return get_default_comm().barrier(group=group, async_op=async_op, device_ids=device_ids, timeout=timeout)


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
    return get_default_comm().monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


# ---- point-to-point -------------------------------------------------------------------------


def send(tensor, dst=None, group=None, tag=0, group_dst=None):
    return get_default_comm().send(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)


def recv(tensor, src=None, group=None, tag=0, group_src=None):
    return get_default_comm().recv(tensor, src=src, group=group, tag=tag, group_src=group_src)


def isend(tensor, dst=None, group=None, tag=0, group_dst=None):
    return get_default_comm().isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)


def irecv(tensor, src=None, group=None, tag=0, group_src=None):
    return get_default_comm().irecv(tensor, src=src, group=group, tag=tag, group_src=group_src)


def batch_isend_irecv(p2p_op_list):
    return get_default_comm().batch_isend_irecv(p2p_op_list)


# ---- objects -----------------------------------------------------------------------------


def all_gather_object(object_list, obj, group=None):
    return get_default_comm().all_gather_object(object_list, obj, group=group)


def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
    return get_default_comm().broadcast_object_list(object_list, src=src, group=group, device=device, group_src=group_src)


def gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
    return get_default_comm().gather_object(obj, object_gather_list, dst=dst, group=group, group_dst=group_dst)


def scatter_object_list(scatter_object_output_list, scatter_object_input_list=None, src=None, group=None, group_src=None):
    return get_default_comm().scatter_object_list(
        scatter_object_output_list, scatter_object_input_list, src=src, group=group, group_src=group_src
    )


def send_object_list(object_list, dst=None, group=None, device=None, group_dst=None, use_batch=False):
    return get_default_comm().send_object_list(object_list, dst=dst, group=group, device=device, group_dst=group_dst)


def recv_object_list(object_list, src=None, group=None, device=None, group_src=None, use_batch=False):
    return get_default_comm().recv_object_list(object_list, src=src, group=group, device=device, group_src=group_src)


COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "gather", "scatter",
    "all_to_all_single", "all_to_all", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list",
)


def __getattr__(name: str):
    """Anything else comes from torch.distributed, except collectives this module lacks."""
    if name in _NOT_PROVIDED:
        raise AttributeError(
            f"xtrain.comm.dist has no {name} (deprecated in torch.distributed); call torch.distributed.{name} "
            "explicitly if you mean the built-in"
        )
    try:
        return getattr(_td, name)
    except AttributeError:
        raise AttributeError(f"module 'xtrain.comm.dist' (and torch.distributed) has no attribute {name!r}") from None


__all__ = [
    "Backend",
    "CollectiveTimeout",
    "CommError",
    "GroupMember",
    "P2POp",
    "ProcessGroup",
    "ReduceOp",
    "Work",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "destroy_process_group",
    "format_ledger_table",
    "gather",
    "gather_object",
    "get_backend",
    "get_default_comm",
    "get_global_rank",
    "get_group_rank",
    "get_ledger",
    "get_process_group_ranks",
    "get_rank",
    "get_world_size",
    "group",
    "init_process_group",
    "irecv",
    "is_available",
    "is_initialized",
    "isend",
    "ledger_table",
    "monitored_barrier",
    "new_group",
    "new_subgroups",
    "recv",
    "recv_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "send_object_list",
    "use",
]
