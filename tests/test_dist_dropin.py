"""``xtrain.comm.dist`` as a drop-in for torch.distributed.

The checks run the *same code* against both modules and compare:

- the tutorial script (pytorch.org's "Writing Distributed Applications"):
  point-to-point, a group all-reduce (a non-member rank on 3 ranks), a
  hand-written ring all-reduce on isend/recv, synchronous SGD over a small
  model; its source is executed once as written and once with its one
  ``import torch.distributed as dist`` line swapped, at 2 and 3 ranks;
- a matrix: every collective x group=None / group.WORLD / a subgroup [0, 2]
  (rank 1 is then the non-member) x sync / async, every reduce op on the
  dtypes gloo takes, every keyword (src/group_src, dst/group_dst, defaults);
- the async handle (is_completed without wait, get_future from the comm's
  thread, wait(timeout)), the ledger's keys and the gathered table,
  monitored_barrier naming the late ranks;
- torch's own DistributedDataParallel with an xtrain comm hook against
  torch's default DDP (2 ranks).

One spawned group per world size (module-scoped fixtures); the tests assert
on what it returned.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as torch_dist

import xtrain.comm.dist as xdist
from xtrain.comm import SOLO, get_comm
from xtrain.spawn import run_on_ranks

TUTORIAL = '''
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def p2p_blocking(rank, size):
    tensor = torch.zeros(1)
    if rank == 0:
        tensor += 1
        dist.send(tensor=tensor, dst=1)
    elif rank == 1:
        dist.recv(tensor=tensor, src=0)
    return tensor.item()


def p2p_nonblocking(rank, size):
    tensor = torch.zeros(1)
    req = None
    if rank == 0:
        tensor += 1
        req = dist.isend(tensor=tensor, dst=1)
    elif rank == 1:
        req = dist.irecv(tensor=tensor, src=0)
    if req is not None:
        req.wait()
    return tensor.item()


def group_all_reduce(rank, size):
    group = dist.new_group([0, 1])
    tensor = torch.ones(1)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.item()


def collectives(rank, size):
    group = dist.new_group(list(range(size)))
    t = torch.arange(4.0) + rank
    dist.broadcast(t, src=0, group=group)
    gathered = [torch.zeros(4) for _ in range(size)]
    dist.all_gather(gathered, torch.full((4,), float(rank)), group=group)
    g = [torch.zeros(2) for _ in range(size)] if rank == 0 else None
    dist.gather(torch.full((2,), float(rank)), g, dst=0, group=group)
    s = torch.zeros(2)
    dist.scatter(s, [torch.full((2,), float(i)) for i in range(size)] if rank == 0 else None, src=0, group=group)
    r = torch.ones(3) * (rank + 1)
    dist.reduce(r, dst=0, op=dist.ReduceOp.PRODUCT, group=group)
    return [t.tolist(), [x.tolist() for x in gathered], [x.tolist() for x in g] if g else None, s.tolist(),
            r.tolist() if rank == 0 else None]


def allreduce(send, recv):
    """The tutorial's ring all-reduce, written on isend and recv."""
    rank = dist.get_rank()
    size = dist.get_world_size()
    send_buff = send.clone()
    recv_buff = send.clone()
    accum = send.clone()

    left = ((rank - 1) + size) % size
    right = (rank + 1) % size

    for i in range(size - 1):
        if i % 2 == 0:
            # Send send_buff
            send_req = dist.isend(send_buff, right)
            dist.recv(recv_buff, left)
            accum[:] += recv_buff[:]
        else:
            # Send recv_buff
            send_req = dist.isend(recv_buff, right)
            dist.recv(send_buff, left)
            accum[:] += send_buff[:]
        send_req.wait()
    recv[:] = accum[:]


def ring(rank, size):
    send = torch.arange(5.0) * (rank + 1)
    recv = torch.zeros(5)
    allreduce(send, recv)
    return recv.tolist()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def average_gradients(model):
    size = float(dist.get_world_size())
    for param in model.parameters():
        dist.all_reduce(param.grad.data, op=dist.ReduceOp.SUM)
        param.grad.data /= size


def run_sgd(rank, size):
    torch.manual_seed(1234)
    data = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 4, (96,), generator=torch.Generator().manual_seed(1))
    shard = slice(rank * 96 // size, (rank + 1) * 96 // size)
    x, y = data[shard], target[shard]
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    losses = []
    for epoch in range(3):
        for i in range(0, len(x), 8):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[i:i + 8]), y[i:i + 8])
            loss.backward()
            average_gradients(model)
            optimizer.step()
            losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def run(rank, size):
    return {
        "p2p_blocking": p2p_blocking(rank, size),
        "p2p_nonblocking": p2p_nonblocking(rank, size),
        "group_all_reduce": group_all_reduce(rank, size),
        "collectives": collectives(rank, size),
        "ring": ring(rank, size),
        "sgd": run_sgd(rank, size),
    }
'''

TORCH_IMPORT = "import torch.distributed as dist"
XTRAIN_IMPORT = "import xtrain.comm.dist as dist"


def _tutorial(rank: int, world: int) -> dict:
    out = {}
    for name, source in (("torch", TUTORIAL), ("xtrain", TUTORIAL.replace(TORCH_IMPORT, XTRAIN_IMPORT))):
        ns: dict = {}
        exec(compile(source, f"<tutorial:{name}>", "exec"), ns)  # noqa: S102 - the test's own script
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-member's warning, from both
            out[name] = ns["run"](rank, world)
    out["ledger_keys"] = sorted(xdist.get_ledger().take_step())
    return out


# ---------------------------------------------------------------- the matrix


def _inp(seed: int, rank: int, n: int = 6, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 131 + rank)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return torch.randint(-9, 10, (n,), generator=g).to(dtype)


RED_CASES = [(op, "float32") for op in ("SUM", "AVG", "MAX", "MIN", "PRODUCT")]
RED_CASES += [(op, "int32") for op in ("SUM", "MAX", "MIN", "PRODUCT", "BAND", "BOR", "BXOR")]
RED_CASES += [(op, "int64") for op in ("BAND", "BOR", "BXOR")]
RED_CASES += [(op, "uint8") for op in ("BAND", "BOR", "BXOR")]
RED_CASES += [(op, "bool") for op in ("SUM", "MAX", "MIN", "PRODUCT", "BAND", "BOR", "BXOR")]


def _matrix(D, rank: int, world: int, sub) -> list:
    """Every function x group mode x sync/async, written once against module ``D``
    (torch.distributed or xtrain.comm.dist). Returns [(case, value)] in call order."""
    out = []
    modes = {"none": None, "world": D.group.WORLD, "sub": sub}
    members = {"none": list(range(world)), "world": list(range(world)), "sub": [0, 2]}

    def done(w, async_op):
        """What a call returned: None (sync, or async on a non-member), else "work" once waited."""
        if async_op and w is not None:
            assert w.wait() is True
            # (torch's own list reduce_scatter on gloo still says False here: checked on xtrain's only)
            assert w.is_completed() or D is torch_dist
            return "work"
        return w

    for mode, g in modes.items():
        ranks = members[mode]
        member = rank in ranks
        n = len(ranks)
        me = ranks.index(rank) if member else -1
        root = ranks[-1]  # global rank of the group's last member (2 on the subgroup)
        for async_op in (False, True):
            k = f"{mode}/{'async' if async_op else 'sync'}"
            seed = len(out)
            for red, dt in RED_CASES:
                t = _inp(seed, rank, dtype=getattr(torch, dt))
                r = D.all_reduce(t, op=getattr(D.ReduceOp, red), group=g, async_op=async_op)
                out.append((f"all_reduce {red} {dt} {k}", (done(r, async_op) is None or async_op, t)))
            t = _inp(seed + 1, rank)
            out.append((f"broadcast src {k}", (done(D.broadcast(t, src=root, group=g, async_op=async_op), async_op), t)))
            t = _inp(seed + 2, rank)
            out.append((f"broadcast group_src {k}",
                        (done(D.broadcast(t, group=g, async_op=async_op, group_src=0), async_op), t)))
            t = _inp(seed + 3, rank)
            out.append((f"reduce dst {k}", (done(D.reduce(t, dst=root, group=g, async_op=async_op), async_op),
                                             t if rank == root else None)))
            t = _inp(seed + 4, rank)
            r = D.reduce(t, op=D.ReduceOp.MAX, group=g, async_op=async_op, group_dst=0)
            out.append((f"reduce group_dst {k}", (done(r, async_op), t if rank == ranks[0] else None)))
            outs = [torch.zeros(6) for _ in range(n)]
            out.append((f"all_gather {k}", (done(D.all_gather(outs, _inp(seed + 5, rank), group=g, async_op=async_op),
                                                 async_op), outs)))
            for fn in ("all_gather_into_tensor", "all_gather_single"):
                o = torch.zeros(6 * n)
                r = getattr(D, fn)(o, _inp(seed + 6, rank), group=g, async_op=async_op)
                out.append((f"{fn} {k}", (done(r, async_op), o)))
            o = torch.zeros(3)
            r = D.reduce_scatter(o, [_inp(seed + 7 + i, rank, 3) for i in range(n)], group=g, async_op=async_op)
            out.append((f"reduce_scatter {k}", (done(r, async_op), o)))
            for fn in ("reduce_scatter_tensor", "reduce_scatter_single"):
                o = torch.zeros(3)
                r = getattr(D, fn)(o, _inp(seed + 8, rank, 3 * n), op=D.ReduceOp.MIN, group=g, async_op=async_op)
                out.append((f"{fn} {k}", (done(r, async_op), o)))
            gl = [torch.zeros(6) for _ in range(n)] if rank == ranks[0] else None
            out.append((f"gather default dst {k}",
                        (done(D.gather(_inp(seed + 9, rank), gl, group=g, async_op=async_op), async_op), gl)))
            gl = [torch.zeros(6) for _ in range(n)] if rank == root else None
            r = D.gather(_inp(seed + 10, rank), gl, group=g, async_op=async_op, group_dst=n - 1)
            out.append((f"gather group_dst {k}", (done(r, async_op), gl)))
            s = torch.zeros(6)
            sl = [_inp(seed + 11 + i, rank) for i in range(n)] if rank == ranks[0] else None
            out.append((f"scatter default src {k}", (done(D.scatter(s, sl, group=g, async_op=async_op), async_op), s)))
            s = torch.zeros(6)
            sl = [_inp(seed + 12 + i, rank) for i in range(n)] if rank == root else None
            r = D.scatter(s, sl, src=root, group=g, async_op=async_op)
            out.append((f"scatter src {k}", (done(r, async_op), s)))
            o = torch.zeros(2 * n, 3)
            r = D.all_to_all_single(o, _inp(seed + 13, rank, 6 * n).view(2 * n, 3), group=g, async_op=async_op)
            out.append((f"all_to_all_single {k}", (done(r, async_op), o)))
            # uneven splits: group rank i sends i + j + 1 rows to group rank j
            if member:
                ins, outs_ = [me + j + 1 for j in range(n)], [i + me + 1 for i in range(n)]
            else:
                ins = outs_ = [1] * n
            o = torch.zeros(sum(outs_), 2)
            r = D.all_to_all_single(o, _inp(seed + 14, rank, 2 * sum(ins)).view(-1, 2), outs_, ins, group=g,
                                    async_op=async_op)
            out.append((f"all_to_all_single uneven {k}", (done(r, async_op), o)))
            ol = [torch.zeros(2) for _ in range(n)]
            r = D.all_to_all(ol, [_inp(seed + 15 + j, rank, 2) for j in range(n)], group=g, async_op=async_op)
            out.append((f"all_to_all {k}", (done(r, async_op), ol)))
            out.append((f"barrier {k}", done(D.barrier(group=g, async_op=async_op), async_op)))
            # point-to-point around the group's ring (the first member sends first)
            nxt, prv = (ranks[(me + 1) % n], ranks[(me - 1) % n]) if member else (0, 0)
            x, got = _inp(seed + 16, rank), torch.zeros(6)
            if async_op:
                sw = D.isend(x, nxt, group=g)
                rw = D.irecv(got, prv, group=g)
                res = [done(sw, True), done(rw, True)]
            elif member and me == 0:
                res = [D.send(x, nxt, group=g), D.recv(got, group=g)]  # any source: returns the sender
            else:
                res = [D.recv(got, src=prv, group=g), D.send(x, nxt, group=g)] if member else [D.recv(got, src=0, group=g)]
            out.append((f"send/recv {k}", (res, got)))
            got = torch.zeros(6)
            r = D.isend(_inp(seed + 17, rank), group=g, tag=5, group_dst=(me + 1) % n) if member else None
            rw = D.irecv(got, group=g, tag=5, group_src=(me - 1) % n) if member else None
            for w in (r, rw):
                if w is not None:
                    w.wait()
            out.append((f"isend/irecv group_dst {k}", got))
            if member:
                got = torch.zeros(6)
                ws = D.batch_isend_irecv([D.P2POp(D.isend, _inp(seed + 18, rank), nxt, group=g),
                                          D.P2POp(D.irecv, got, group=g, group_peer=(me - 1) % n)])
                for w in ws:
                    w.wait()
                out.append((f"batch_isend_irecv {k}", (len(ws), got)))
            if async_op:
                continue  # the object collectives have no async form
            objs = [None] * n
            out.append((f"all_gather_object {k}", (D.all_gather_object(objs, {"rank": rank, "x": [rank] * rank}, group=g),
                                                   objs)))
            lst = [rank, f"from {rank}", {"k": (rank,)}]
            out.append((f"broadcast_object_list {k}", (D.broadcast_object_list(lst, src=root, group=g), lst)))
            lst = [None, None]
            if rank == ranks[0]:
                lst = ["a" * 50, 7]
            out.append((f"broadcast_object_list group_src {k}", (D.broadcast_object_list(lst, group=g, group_src=0), lst)))
            gl = [None] * n if rank == root else None
            out.append((f"gather_object {k}", (D.gather_object(("r", rank), gl, dst=root, group=g), gl)))
            gl = [None] * n if rank == ranks[0] else None
            out.append((f"gather_object default dst {k}", (D.gather_object(rank * 3, gl, group=g), gl)))
            ol = [None]
            il = [{"to": i, "pad": "y" * i} for i in range(n)] if rank == ranks[0] else None
            out.append((f"scatter_object_list {k}", (D.scatter_object_list(ol, il, group=g), ol)))
            ol = [None]
            il = [i * 11 for i in range(n)] if rank == root else None
            out.append((f"scatter_object_list group_src {k}", (D.scatter_object_list(ol, il, group=g, group_src=n - 1), ol)))
            if member:
                lst = [rank, "obj"] if me == 0 else [None, None]
                if me == 0:
                    res = D.send_object_list(lst, dst=ranks[1], group=g)
                elif me == 1:
                    res = D.recv_object_list(lst, src=ranks[0], group=g)
                else:
                    res = None
                out.append((f"send/recv_object_list {k}", (res, lst)))
            out.append((f"monitored_barrier {k}", D.monitored_barrier(group=g, timeout=timedelta(seconds=60))))
    return out


def _same(a, b) -> str | None:
    """None if ``a`` and ``b`` agree (tensors within float round-off), else why not."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.dtype.is_floating_point:
            return None if torch.allclose(a, b, rtol=1e-5, atol=1e-6) else f"{a.tolist()} vs {b.tolist()}"
        return None if torch.equal(a, b) else f"{a.tolist()} vs {b.tolist()}"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"lengths {len(a)} vs {len(b)}"
        for x, y in zip(a, b):
            why = _same(x, y)
            if why:
                return why
        return None
    if type(a).__name__ in ("Work", "_Work") or type(b).__name__ in ("Work", "_Work"):  # handles: both present
        return None if (a is None) == (b is None) else f"{a!r} vs {b!r}"
    return None if a == b else f"{a!r} vs {b!r}"


def _errors(D, rank: int) -> dict:
    """Bad input: the same refusal from both modules (exception class family and key words)."""
    out = {}
    t = torch.ones(3)
    for name, call in (
        ("broadcast without src", lambda: D.broadcast(t)),
        ("reduce without dst", lambda: D.reduce(t)),
        ("src and group_src", lambda: D.broadcast(t, src=0, group_src=0)),
        ("BAND on float", lambda: D.all_reduce(torch.ones(3), op=D.ReduceOp.BAND)),
        ("PREMUL_SUM", lambda: D.all_reduce(torch.ones(3), op=torch_dist._make_nccl_premul_sum(2.0))),
    ):
        try:
            call()
            out[name] = None
        except (ValueError, RuntimeError) as e:
            out[name] = ("ValueError" if isinstance(e, ValueError) else "RuntimeError", str(e))
    return out


def _work_checks(rank: int, world: int) -> dict:
    """The async handle: completion without wait, futures from the comm's thread, wait(timeout)."""
    out = {}
    ledger = xdist.get_ledger()
    main = threading.get_ident()
    # completes (and is recorded) without anyone waiting
    before = ledger.entry("all_reduce", "world").calls
    t = torch.full((1000,), float(rank + 1))
    if rank == 1:
        time.sleep(0.3)  # so the others' op cannot finish before their callback is attached
    w = xdist.all_reduce(t, async_op=True)
    fut = w.get_future()
    chained = fut.then(lambda f: (threading.get_ident(), f.value()[0].sum().item()))
    deadline = time.monotonic() + 20
    while not w.is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    out["completed_unwaited"] = w.is_completed()
    while ledger.entry("all_reduce", "world").calls == before and time.monotonic() < deadline:
        time.sleep(0.001)
    out["recorded_unwaited"] = ledger.entry("all_reduce", "world").calls - before
    thread, total = chained.wait()
    out["future_thread_is_main"] = thread == main
    out["future_value"] = total
    out["future_is_list_of_result"] = isinstance(fut.value(), list) and fut.value()[0] is t
    # an isend that is never waited is recorded once the message is done
    peer, prev = (rank + 1) % world, (rank - 1) % world
    before = ledger.entry("isend", "world").calls
    xdist.isend(torch.ones(4), peer, tag=9)
    box = torch.zeros(4)
    xdist.recv(box, prev, tag=9)
    while ledger.entry("isend", "world").calls == before and time.monotonic() < deadline:
        time.sleep(0.001)
    out["isend_recorded_unwaited"] = ledger.entry("isend", "world").calls - before
    # wait(timeout) honours its timeout: rank 1 joins the all-reduce 1.5 s late
    g01 = xdist.new_group([0, 1])
    if rank == 2:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["nonmember_async"] = xdist.all_reduce(torch.ones(2), group=g01, async_op=True)
        out["nonmember_warning"] = [str(c.message) for c in caught]
    else:
        if rank == 1:
            time.sleep(1.5)
        t = torch.full((8,), float(rank + 1))
        w = xdist.all_reduce(t, group=g01, async_op=True)
        if rank == 0:
            t0 = time.perf_counter()
            try:
                w.wait(timeout=timedelta(seconds=0.3))
                out["timeout"] = "no error"
            except xdist.CollectiveTimeout as e:
                out["timeout"] = (str(e), time.perf_counter() - t0, w.is_completed())
        out["after_timeout"] = (w.wait(), t.tolist())
    xdist.barrier()
    return out


def _ledger_checks(rank: int, world: int) -> dict:
    """Keys by method name and by group; the gathered table."""
    led = xdist.get_ledger()
    twin_a = xdist.new_group([0, 2])  # the matrix's subgroup came first: these are the 2nd and 3rd over [0, 2]
    twin_b = xdist.new_group([0, 2])
    named = xdist.new_group([0, 1, 2])
    from xtrain.comm import label_group

    label_group(named, "dp")
    if rank != 1:
        xdist.all_reduce(torch.ones(2), group=twin_a)
        xdist.all_reduce(torch.ones(4), group=twin_b)
    xdist.all_reduce(torch.ones(8), group=named)
    out = {"summary": led.summary_rows(), "steps": led.take_step()}
    out["table"] = xdist.ledger_table()
    out["text"] = xdist.format_ledger_table(out["table"]) if rank == 0 else ""
    out["summary_after"] = led.summary_rows()  # the gather left no trace
    return out


def _monitored_failures(rank: int, world: int) -> dict:
    """monitored_barrier names the late ranks: rank 2 late; then ranks 1 and 2 late with wait_all_ranks."""
    out = {}
    for case, late, wait_all in (("one", {2}, False), ("all", {1, 2}, True)):
        if rank in late:
            time.sleep(2.0)
        t0 = time.perf_counter()
        try:
            xdist.monitored_barrier(timeout=timedelta(seconds=1.0), wait_all_ranks=wait_all)
            out[case] = ("passed", time.perf_counter() - t0)
        except xdist.CollectiveTimeout as e:
            out[case] = (str(e), time.perf_counter() - t0)
        xdist.barrier()
    return out


def _world3(rank: int, world: int) -> dict:
    res = {"tutorial": _tutorial(rank, world)}
    sub = torch_dist.new_group([0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res["matrix_torch"] = _matrix(torch_dist, rank, world, sub)
        res["matrix_xtrain"] = _matrix(xdist, rank, world, sub)
        res["errors_torch"] = _errors(torch_dist, rank)
        res["errors_xtrain"] = _errors(xdist, rank)
    if rank == 1:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = torch.ones(3)
            res["nonmember"] = [xdist.all_reduce(t, group=sub), xdist.barrier(group=sub), xdist.recv(t, 0, group=sub),
                                xdist.send(t, 0, group=sub), xdist.broadcast(t, group=sub), t.tolist()]
        res["nonmember_warnings"] = [str(c.message) for c in caught]
    res["work"] = _work_checks(rank, world)
    res["ledger"] = _ledger_checks(rank, world)
    res["monitored"] = _monitored_failures(rank, world)
    return res


# ---------------------------------------------------------------- DDP with an xtrain comm hook


def _ddp(rank: int, world: int) -> dict:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    state = {"threads": set(), "calls": 0}
    main = threading.get_ident()

    def hook(st, bucket):
        st["calls"] += 1
        fut = xdist.all_reduce(bucket.buffer(), async_op=True).get_future()

        def average(f):
            st["threads"].add(threading.get_ident())
            return f.value()[0].div_(world)

        return fut.then(average)

    ref = DDP(model(), bucket_cap_mb=0.005)
    mine = DDP(model(), bucket_cap_mb=0.005)
    mine.register_comm_hook(state, hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, mine)]
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(4):
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        for m, opt in zip((ref, mine), opts):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), mine.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model().parameters()))
    return {
        "max_param_diff": diff,
        "moved": moved,
        "hook_calls": state["calls"],
        # a callback runs on the thread that completes the future: the comm's, unless the
        # op had already finished when the hook attached it (then inline, on this thread)
        "completed_off_main_thread": any(t != main for t in state["threads"]),
        "ledger": xdist.get_ledger().entry("all_reduce", "world").calls,
    }


def _world2(rank: int, world: int) -> dict:
    return {"tutorial": _tutorial(rank, world), "ddp": _ddp(rank, world)}


@pytest.fixture(scope="module")
def world3():
    return run_on_ranks(_world3, 3, timeout=240, pg_timeout=60)


@pytest.fixture(scope="module")
def world2():
    return run_on_ranks(_world2, 2, timeout=180, pg_timeout=60)


# ---------------------------------------------------------------- tests


def _check_tutorial(results, world):
    for rank, r in enumerate(results):
        t, x = r["tutorial"]["torch"], r["tutorial"]["xtrain"]
        for key in ("p2p_blocking", "p2p_nonblocking", "group_all_reduce", "collectives", "ring"):
            assert x[key] == t[key], (rank, key, x[key], t[key])
        (tl, tp), (xl, xp) = t["sgd"], x["sgd"]
        assert len(xl) == len(tl) and max(abs(a - b) for a, b in zip(xl, tl)) < 1e-5, (rank, xl, tl)
        for a, b in zip(xp, tp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # expected values, independently of torch
        assert x["ring"] == [float(v * sum(range(1, world + 1))) for v in range(5)]
        assert x["group_all_reduce"] == (2.0 if rank < 2 else 1.0)  # rank 2 is not in [0, 1]: untouched
        keys = r["tutorial"]["ledger_keys"]
        assert "all_reduce@world" in keys and "isend@world" in keys and "recv@world" in keys, keys
        # the drop-in run's group over [0, 1] is the second one over those ranks (the torch run made the first)
        assert any(k.startswith("all_reduce@g[0,1]#") for k in keys) == (rank < 2), keys
        assert not any(k.endswith("@group") for k in keys), keys


def test_tutorial_runs_unchanged_on_the_dropin_2_ranks(world2):
    assert TUTORIAL.count(TORCH_IMPORT) == 1
    _check_tutorial(world2, 2)


def test_tutorial_runs_unchanged_on_the_dropin_3_ranks(world3):
    _check_tutorial(world3, 3)


def test_every_function_group_and_mode_matches_torch(world3):
    for rank, r in enumerate(world3):
        got, want = r["matrix_xtrain"], r["matrix_torch"]
        assert [c for c, _ in got] == [c for c, _ in want]
        assert len(got) > 150, len(got)
        bad = [(c, why) for (c, a), (_, b) in zip(got, want) if (why := _same(a, b))]
        assert not bad, f"rank {rank}: " + "\n".join(f"{c}: {w}" for c, w in bad[:20])
    # the non-member (rank 1 on the subgroup) saw no change and got None from every call
    sub_cases = [(c, v) for c, v in world3[1]["matrix_xtrain"] if c.split()[-1].startswith("sub/")]
    assert sub_cases
    for case, value in sub_cases:
        if case.startswith(("broadcast ", "all_gather ", "all_to_all ", "scatter ", "gather ", "reduce ")):
            assert value[0] is None, (case, value[0])


def test_non_member_returns_without_communicating_and_warns(world3):
    r = world3[1]
    assert r["nonmember"] == [None, None, -1, None, None, [1.0, 1.0, 1.0]]
    assert len(r["nonmember_warnings"]) == 5
    assert all("does not belong to the given group" in w for w in r["nonmember_warnings"])
    w = world3[2]["work"]  # rank 2 is not in the [0, 1] group of the handle checks
    assert w["nonmember_async"] is None and "does not belong" in w["nonmember_warning"][0]


def test_bad_input_is_refused_like_torch(world3):
    for r in world3:
        x, t = r["errors_xtrain"], r["errors_torch"]
        for case in ("broadcast without src", "reduce without dst", "src and group_src"):
            assert x[case][0] == t[case][0] == "ValueError", (case, x[case], t[case])
        assert x["BAND on float"] is not None and t["BAND on float"] is not None
        assert "BAND" in x["BAND on float"][1] and "non-integral" in x["BAND on float"][1]
        assert x["PREMUL_SUM"] is not None and "PREMUL_SUM" in x["PREMUL_SUM"][1]


def test_async_handle_completes_records_and_times_out(world3):
    for rank, r in enumerate(world3):
        w = r["work"]
        assert w["completed_unwaited"] and w["recorded_unwaited"] == 1, w
        assert w["isend_recorded_unwaited"] == 1, w
        assert w["future_value"] == 1000 * 6.0
        if rank != 1:  # rank 1 arrived last: its op may complete before its callback is attached
            assert not w["future_thread_is_main"]
        assert w["future_is_list_of_result"]
    msg, waited, completed = world3[0]["work"]["timeout"]
    # the third group over [0, 1] (the tutorial's two runs made the first two)
    assert "all_reduce on group 'g[0,1]#3' timed out" in msg, msg
    assert 0.25 < waited < 1.2 and not completed, (waited, completed)
    for rank in (0, 1):
        assert world3[rank]["work"]["after_timeout"] == (True, [3.0] * 8)


def test_ledger_keys_are_method_names_and_group_labels(world3):
    for rank, r in enumerate(world3):
        keys = {(op, g) for op, g, *_ in r["ledger"]["summary"]}
        ops = {op for op, _ in keys}
        # every function the matrix called, under its own name
        for op in ("all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter", "reduce_scatter_tensor",
                   "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast", "reduce", "gather", "scatter",
                   "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_gather_object",
                   "broadcast_object_list", "gather_object", "scatter_object_list", "monitored_barrier"):
            assert op in ops, (rank, op, sorted(ops))
        groups = {g for _, g in keys}
        assert "group" not in groups
        if rank != 1:
            assert {"g[0,2]", "g[0,2]#2", "g[0,2]#3"} <= groups, groups
        else:
            assert not any(g.startswith("g[0,2]") for g in groups), groups
        assert "dp" in groups and "world" in groups
        e = {(op, g): (calls, sent) for op, g, calls, sent, *_ in r["ledger"]["summary"]}
        if rank != 1:
            assert e[("all_reduce", "g[0,2]#2")] == (1, 8) and e[("all_reduce", "g[0,2]#3")] == (1, 16)
        assert r["ledger"]["summary_after"] == r["ledger"]["summary"]


def test_ledger_table_gathers_every_rank(world3):
    table = world3[0]["ledger"]["table"]
    assert all(r["ledger"]["table"] == table for r in world3)
    rows = {(row["op"], row["group"]): row for row in table}
    for rank, r in enumerate(world3):
        for op, g, calls, sent, recv, wall, blocked in r["ledger"]["summary"]:
            row = rows[(op, g)]
            assert (row["calls"][rank], row["bytes_sent"][rank], row["bytes_recv"][rank]) == (calls, sent, recv)
            assert row["wall_s"][rank] == wall and row["blocked_s"][rank] == blocked
    assert 1 not in rows[("all_reduce", "g[0,2]#2")]["calls"]
    text = world3[0]["ledger"]["text"]
    assert "all_gather_into_tensor" in text and "g[0,2]#2" in text


def test_monitored_barrier_names_the_ranks_that_did_not_arrive(world3):
    for rank, r in enumerate(world3):
        one, allr = r["monitored"]["one"], r["monitored"]["all"]
        assert "global rank 2 did not arrive" in one[0], (rank, one)
        assert "global ranks 1, 2 did not arrive" in allr[0], (rank, allr)
        if rank == 0:
            assert 0.9 < one[1] < 1.8 and 0.9 < allr[1] < 1.8, (one, allr)


def test_ddp_with_an_xtrain_comm_hook_matches_torch_ddp(world2):
    for r in world2:
        d = r["ddp"]
        assert d["moved"] > 1e-3  # training changed the parameters
        assert d["max_param_diff"] < 1e-5, d
        assert d["hook_calls"] >= 4, d  # every bucket of every step went through the hook
        assert d["completed_off_main_thread"], d  # the future completed from the comm's thread
        assert d["ledger"] >= d["hook_calls"]


# ---------------------------------------------------------------- single process


def test_signatures_match_torch():
    for name in xdist.COLLECTIVES:
        ours, theirs = inspect.signature(getattr(xdist, name)), inspect.signature(getattr(torch_dist, name))
        assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
            (p.name, p.default, p.kind) for p in theirs.parameters.values()
        ], name
    ours = inspect.signature(xdist.P2POp.__init__)
    theirs = inspect.signature(torch_dist.P2POp.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [(p.name, p.default) for p in theirs.parameters.values()]


def test_non_collectives_are_torch_s_own():
    for name in ("init_process_group", "get_rank", "get_world_size", "new_group", "destroy_process_group",
                 "is_initialized", "ReduceOp", "group", "Backend", "GroupMember", "get_backend", "TCPStore"):
        assert getattr(xdist, name) is getattr(torch_dist, name), name
    assert xdist.group.WORLD is torch_dist.group.WORLD
    assert xdist.get_node_local_rank is torch_dist.get_node_local_rank  # through the fallback
    with pytest.raises(AttributeError, match="all_reduce_coalesced"):
        xdist.all_reduce_coalesced  # noqa: B018 - a collective it lacks must not fall through to torch's
    with pytest.raises(ValueError, match="isend or irecv"):
        xdist.P2POp(print, torch.ones(1), 0)


def test_reduce_op_refusals_name_the_op():
    comm = get_comm("xtrain")
    with pytest.raises(ValueError, match="PREMUL_SUM"):
        comm.all_reduce(torch.ones(3), op=torch_dist._make_nccl_premul_sum(2.0), group=SOLO)
    with pytest.raises(ValueError, match="PREMUL_SUM"):
        comm.all_reduce(torch.ones(3), op=torch_dist.ReduceOp.PREMUL_SUM, group=SOLO)
    with pytest.raises(ValueError, match="'sum' is not supported"):
        comm.all_reduce(torch.ones(3), op="sum", group=SOLO)
    with pytest.raises(TypeError, match="BXOR"):
        comm.all_reduce(torch.ones(3), op=torch_dist.ReduceOp.BXOR, group=SOLO)
    with pytest.raises(RuntimeError, match="complex"):
        comm.all_reduce(torch.ones(3, dtype=torch.complex64), op=torch_dist.ReduceOp.MAX, group=SOLO)
    x = torch.tensor([5, 3], dtype=torch.int32)
    comm.all_reduce(x, op=torch_dist.ReduceOp.BAND, group=SOLO)
    assert x.tolist() == [5, 3]


def test_work_wait_timeout_and_future_without_a_process_group():
    from xtrain.comm.base import Work

    w = Work("all_reduce", SOLO, [torch.ones(1)])
    fut = w.get_future()
    t0 = time.perf_counter()
    with pytest.raises(xdist.CollectiveTimeout, match=r"wait\(timeout=0.2 s\)"):
        w.wait(timeout=timedelta(seconds=0.2))
    assert 0.15 < time.perf_counter() - t0 < 1.0 and not w.is_completed() and not fut.done()
    threading.Timer(0.05, w._done).start()
    assert fut.wait()[0].item() == 1.0 and w.wait(0.5) and w.is_completed()
    assert w.get_future() is fut
    failed = Work("broadcast", SOLO)
    failed._done(RuntimeError("peer gone"))
    with pytest.raises(xdist.CommError, match="broadcast on group 'solo' failed: peer gone"):
        failed.wait()
    with pytest.raises(xdist.CommError):
        failed.get_future().wait()
