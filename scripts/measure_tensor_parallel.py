#!/usr/bin/env python
"""Tensor parallel's memory and communication, measured and against the formulas
in docs/tensor-parallel.md.

    python scripts/measure_tensor_parallel.py            # model=small with 8 heads / 2 kv heads, 4 ranks
    python scripts/measure_tensor_parallel.py --json out.json

Three measurements, in one 4-rank gloo job (tp=2 runs with dp=2):

1. Parameter bytes per rank of the transformer blocks (live tensors after
   ``apply_tensor_parallel``) against ``single``'s, by kind: sharded matmuls,
   the kv projections (sharded when n_kv_heads % tp == 0, whole on every
   rank when tp % n_kv_heads == 0) and the norms (always whole).
2. Activation memory: the bytes autograd saves for backward in one forward
   (model and loss) of a (B, T) batch, counted with
   ``torch.autograd.graph.saved_tensors_hooks`` over distinct storages,
   parameters excluded; tp=2 and tp=4, sequence parallel off and on.
3. Communication: the tp group's bytes sent per rank and step from the comm
   ledger of a real run (``xtrain.train.run``, ``strategy=tp``,
   ``comm=xtrain``) against ``xtrain.formulas.tp_comm_per_step``. The
   per-layer figure is measured as the difference of two runs that differ
   only in n_layers, divided by the difference in layers, so it comes from
   the ledger alone.

The formulas live in ``xtrain.formulas`` (tensor-parallel section);
tests/test_tp_formulas.py checks them with this script's measurement helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from xtrain.formulas import tp_comm_per_step  # noqa: E402

# -- reading the ledger -------------------------------------------------------------------


def ledger_tp(comm: dict) -> dict:
    """The tp group's entries of one step's ``comm`` record, by op family (the formulas' names:
    the ledger keys ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` count as
    ``all_gather`` and ``reduce_scatter``)."""
    from xtrain.comm.ledger import op_family

    out: dict = {}
    for k, v in comm.items():
        if k.endswith("@tp"):
            e = out.setdefault(op_family(k.split("@")[0]), {"calls": 0, "bytes_sent": 0})
            e["calls"] += v["calls"]
            e["bytes_sent"] += v["bytes_sent"]
    return out


# -- measurement helpers (run inside a rank) -----------------------------------------------


def block_param_bytes(model) -> dict:
    """Bytes of the transformer blocks' parameters on this rank, by kind."""
    out = {"matmuls (wq, wo, gate, up, down)": 0, "kv (wk, wv)": 0, "norms": 0}
    for name, p in model.blocks.named_parameters():
        kind = "norms" if "norm" in name else "kv (wk, wv)" if (".wk." in name or ".wv." in name) else "matmuls (wq, wo, gate, up, down)"
        out[kind] += p.numel() * p.element_size()
    out["total"] = sum(out.values())
    return out


def saved_activation_bytes(model, loss_fn, x, y) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward
    (model and loss), parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    del loss
    return sum(seen.values())


def _model_cfg(overrides):
    from xtrain.config import compose
    from xtrain.model import ModelConfig

    cfg = compose(overrides)
    return cfg, ModelConfig.from_dict(dict(cfg.model.items()))


def memory_cases(rank, world, model_over, B, T, tps=(2, 4)) -> dict:
    """Parameter bytes and saved activation bytes at each tp, sp off and on (rank 0's)."""
    import torch.nn.functional as F

    from xtrain.comm import get_comm
    from xtrain.data import load_data, local_batch
    from xtrain.mesh import Mesh
    from xtrain.model import build_model
    from xtrain.parallel.tensor import apply_tensor_parallel

    cfg, mcfg = _model_cfg(model_over)
    data = load_data(cfg.data)
    x, y = local_batch(data.train, seed=0, step=0, global_batch_size=B, seq_len=T)
    single = build_model(mcfg, 0)
    out = {"single": {"params": block_param_bytes(single),
                      "saved": saved_activation_bytes(single, lambda lg, t: F.cross_entropy(lg.flatten(0, 1), t.flatten()), x, y)}}
    comm = get_comm("xtrain")
    for tp in tps:
        mesh = Mesh.build(world, rank, tp=tp)
        for sp in (False, True):
            model = apply_tensor_parallel(build_model(mcfg, 0), mesh, comm, sequence_parallel=sp)
            saved = saved_activation_bytes(model, model.tp_context.loss, x, y)
            out[f"tp{tp}" + ("_sp" if sp else "")] = {"params": block_param_bytes(model), "saved": saved}
    return out


def comm_run(rank, model_over, tp, sp, B_global, T, steps, root, name) -> dict:
    """One short real run (rank 0's last step comm record and local batch)."""
    from xtrain.config import compose
    from xtrain.train import run

    over = [*model_over, "strategy=tp", f"strategy.tp={tp}", f"strategy.sp={str(sp).lower()}", "comm=xtrain",
            f"train.global_batch_size={B_global}", f"train.seq_len={T}", f"train.steps={steps}",
            "train.eval_every=0", "train.ckpt_every=0", "train.progress=false", "train.log_every=1", "device=cpu"]
    cfg = compose(over)
    run_dir = Path(root) / name
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg, run_dir)
    if rank != 0:  # only rank 0 writes metrics.jsonl
        return {"comm": None}
    return {"comm": json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["comm"]}


def measure_worker(rank, world, model_over, B_act, T_act, B_global, T, layers, root):
    torch.set_num_threads(1)
    out = {"memory": memory_cases(rank, world, model_over, B_act, T_act)}
    runs = {}
    for tp in (2, 4):
        for sp in (False, True):
            for L in layers:
                name = f"tp{tp}{'_sp' if sp else ''}_L{L}"
                runs[name] = comm_run(rank, [*model_over, f"model.n_layers={L}"], tp, sp, B_global, T, 1, root, name)
    out["comm"] = runs
    return out if rank == 0 else None


# -- report ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--heads", default="8,2", help="n_heads,n_kv_heads (default 8,2: kv sharded at tp=2, replicated at tp=4)")
    ap.add_argument("--act-batch", type=int, default=2, help="sequences in the activation-memory forward (default 2)")
    ap.add_argument("--act-seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global batch of the comm runs (default 8)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--layers", default="6,3", help="n_layers of the two comm runs per case (default 6,3)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from xtrain.spawn import run_on_ranks

    H, K = (int(v) for v in args.heads.split(","))
    model_over = [f"model={args.model}", f"model.n_heads={H}", f"model.n_kv_heads={K}"]
    layers = [int(v) for v in args.layers.split(",")]
    root = tempfile.mkdtemp(prefix="xtrain-measure-tp-")
    res = run_on_ranks(measure_worker, 4, model_over, args.act_batch, args.act_seq_len, args.batch, args.seq_len, layers, root,
                       timeout=1800, pg_timeout=600)[0]
    cfg, mcfg = _model_cfg(model_over)
    print(f"model={args.model} dim {mcfg.dim}, {mcfg.n_layers} layers, {H} heads, {K} kv heads, ffn {mcfg.ffn_hidden}; 4 gloo ranks, torch {torch.__version__}")

    mem = res["memory"]
    s = mem["single"]
    print("\n### Parameter bytes of the transformer blocks, per rank\n")
    kinds = [k for k in s["params"] if k != "total"] + ["total"]
    print("| layout | " + " | ".join(kinds) + " | total / single |")
    print("|---|" + "---:|" * (len(kinds) + 1))
    for name in ("single", "tp2", "tp4"):
        p = mem[name]["params"]
        print(f"| {name} | " + " | ".join(f"{p[k]:,}" for k in kinds) + f" | {p['total'] / s['params']['total']:.4f} |")

    print(f"\n### Saved activation bytes, one forward + loss of {args.act_batch}x{args.act_seq_len} tokens, per rank\n")
    print("| tp | sp off | sp on | on / off | off / single |")
    print("|---|---:|---:|---:|---:|")
    print(f"| single | {s['saved']:,} | | | 1 |")
    for tp in (2, 4):
        off, on = mem[f"tp{tp}"]["saved"], mem[f"tp{tp}_sp"]["saved"]
        print(f"| {tp} | {off:,} | {on:,} | {on / off:.3f} | {off / s['saved']:.3f} |")

    print(f"\n### tp group bytes sent per rank and step (rank 0), global batch {args.batch}, seq {args.seq_len}\n")
    print("| tp | sp | op | ledger calls | formula calls | ledger bytes | formula bytes | ledger/formula | per layer: ledger (diff of L) | per layer: formula |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    La, Lb = layers
    for tp in (2, 4):
        B = args.batch // (4 // tp)  # dp = 4 / tp
        for sp in (False, True):
            tag = f"tp{tp}{'_sp' if sp else ''}"
            got = {L: ledger_tp(res["comm"][f"{tag}_L{L}"]["comm"]) for L in layers}
            mc = mcfg.__class__(**{**mcfg.__dict__, "n_layers": La})
            want = tp_comm_per_step(mc, B, args.seq_len, tp, sp)
            # per layer: the formula's growth from Lb to La layers (activation collectives,
            # plus the partial-gradient buffer's growth when there is one)
            mb_ = mcfg.__class__(**{**mcfg.__dict__, "n_layers": Lb})
            want_b = tp_comm_per_step(mb_, B, args.seq_len, tp, sp)["total"]
            for op, w in sorted(want["total"].items()):
                g = got[La].get(op, {"calls": 0, "bytes_sent": 0})
                diff = (g["bytes_sent"] - got[Lb].get(op, {"bytes_sent": 0})["bytes_sent"]) / (La - Lb)
                pl = (w["bytes_sent"] - want_b.get(op, {"bytes_sent": 0})["bytes_sent"]) / (La - Lb)
                print(f"| {tp} | {'on' if sp else 'off'} | {op} | {g['calls']} | {w['calls']} | {g['bytes_sent']:,} | {w['bytes_sent']:,.0f} | "
                      f"{g['bytes_sent'] / w['bytes_sent']:.4f} | {diff:,.0f} | {pl:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
