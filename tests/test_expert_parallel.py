"""Mixture-of-experts training and expert parallelism against strategy=single.

- The dispatch path (sort, count exchange, all-to-all or all-gather, grouped
  experts, combine) on ep = 2 and 4 gloo ranks equals the single-process
  layer's output and gradients (1e-5, fp32) for top_k 1 and 2, with shared
  experts, with experts that receive no token.
- Global-batch balancing: the aux loss's gradient through the layers' own
  backward equals the model's ``return_aux`` loss; training is the same at 1
  and 2 micro-batches; the logged aux loss is the same at world 1, 2 and 4.
- Training parity, 10 steps, model=tiny_moe with the aux and z losses turned
  up (1.0 and 0.1, so a wrong scale shows: the aux loss alone moves the
  parameters by 1e-2): ep2 and ep4 with both routers and both dispatchers,
  capacity mode, 2 micro-batches, ep2 x dp2 (ddp, zero1, zero3), ep2 x tp2 (and
  zero2), ep2 x pp2, ep2 x cp2; checkpoints resume exactly (the router's
  bias included), at another ep degree, and consolidate.
"""

import json

import pytest
import torch
from parity import TINY_10_STEPS, assert_consolidates, assert_parity, run_config, run_many, single_reference

from xtrain.comm import get_comm
from xtrain.config import check_config, compose
from xtrain.mesh import Mesh
from xtrain.model import ModelConfig
from xtrain.model.moe import MoE, router_losses
from xtrain.model.transformer import build_model
from xtrain.parallel.expert import AllGatherDispatcher, AllToAllDispatcher
from xtrain.spawn import run_on_ranks

AUX = ("model=tiny_moe", "model.aux_loss_coef=1.0", "model.z_loss_coef=0.1")
BASE = (*TINY_10_STEPS, *AUX)


def _layer(cfg, seed=0):
    torch.manual_seed(seed)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def _dispatch_cases(rank, world):
    mesh = Mesh.build(world, rank, ep=world)
    comm = get_comm("xtrain")
    out = {}
    for top_k in (1, 2):
        for shared in (0, 1):
            cfg = ModelConfig(dim=16, n_experts=2 * world, top_k=top_k, n_shared_experts=shared, moe_ffn_hidden=8)
            ref = _layer(cfg)
            with torch.no_grad():  # starve expert 1: nobody routes to it
                ref.router.weight[1] = -10.0
            # positive inputs, so expert 1's logit (-10 times their sum) never wins
            x_all = torch.rand(world, 3, 8, 16, generator=torch.Generator().manual_seed(top_k + 2 * shared))
            xr = x_all.clone().requires_grad_()
            y_ref = ref(xr.flatten(0, 1))
            (y_ref.square().sum() / world).backward()
            for kind, cls in (("alltoall", AllToAllDispatcher), ("allgather", AllGatherDispatcher)):
                m = _layer(cfg)
                with torch.no_grad():
                    m.router.weight[1] = -10.0
                local = cfg.n_experts // world
                for name in ("gate", "up", "down"):
                    setattr(m.experts, name, torch.nn.Parameter(getattr(m.experts, name).detach()[rank * local : (rank + 1) * local].clone()))
                m.dispatcher = cls(comm, mesh.group("ep"), world, rank, cfg.n_experts)
                x = x_all[rank].clone().requires_grad_()
                y = m(x)
                (y.square().sum() / world).backward()
                err = {"out": (y - y_ref[3 * rank : 3 * rank + 3]).abs().max().item(),
                       "dx": (x.grad - xr.grad[rank]).abs().max().item()}
                for name in ("gate", "up", "down"):
                    mine = getattr(m.experts, name).grad
                    err[name] = (mine - getattr(ref.experts, name).grad[rank * local : (rank + 1) * local]).abs().max().item()
                dense = [(n, p) for n, p in m.named_parameters() if not n.startswith("experts.")]
                for n, p in dense:  # dense gradients: each rank has its tokens' share; the sum is the whole
                    g = p.grad.clone()
                    comm.all_reduce(g, group=mesh.group("ep"))
                    err[n] = (g - dict(ref.named_parameters())[n].grad).abs().max().item()
                if rank == 0:  # the starved expert (global 1) lives here: a zero gradient, not None
                    err["starved"] = max(getattr(m.experts, n).grad[1].abs().max().item() for n in ("gate", "up", "down"))
                out[(kind, top_k, shared)] = err
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_matches_the_single_process_layer(world):
    for rank, res in enumerate(run_on_ranks(_dispatch_cases, world, timeout=180, pg_timeout=60)):
        for case, errors in res.items():
            for name, e in errors.items():
                assert e <= 1e-5, f"ep={world} rank {rank} {case}: {name} differs by {e:.3g}"


def test_aux_loss_through_the_layers_equals_the_models_loss():
    """One process, one micro-batch: the hook's gradient is the model's return_aux loss's."""
    from xtrain.parallel import STRATEGIES

    cfg = compose([*BASE, "train.seq_len=16"])
    mcfg = ModelConfig.from_dict(dict(cfg.model))
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    ref = build_model(mcfg, 0)
    logits, aux = ref(x, return_aux=True)
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) + aux["aux_loss"] + aux["z_loss"]).backward()
    got = build_model(mcfg, 0)
    from xtrain.mesh import single_process_mesh

    strategy = STRATEGIES["single"](single_process_mesh(), get_comm("xtrain"), cfg.strategy)
    got = strategy.parallelize(got)
    import contextlib

    strategy.begin_step(x, y, 1, contextlib.nullcontext())
    strategy.runner.forward_backward(x, y, 1, contextlib.nullcontext())
    figures = strategy.end_step()
    for (n, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-6, n
    raw_aux, _ = router_losses(mcfg, [m.last_stats for m in ref.moe_layers()])  # aux_loss_coef is 1 here
    assert figures["moe_aux_loss"] == pytest.approx(raw_aux.item(), rel=1e-6)
    assert [sum(c) for c in figures["moe_tokens_per_expert"]] == [4 * 16 * mcfg.top_k] * 2


def test_training_is_the_same_at_any_micro_batch_count(tmp_path):
    one = single_reference((*BASE, f"train.out_dir={tmp_path / 'one'}"))
    two = run_config([*BASE, "strategy=single", "train.micro_batches=4", f"train.out_dir={tmp_path / 'four'}"])
    assert_parity(one, two, label="single, 4 micro-batches")


TWO = [
    "strategy=ep",
    "strategy=ep strategy.ep_dispatch=allgather",
    "strategy=ep model.router=sigmoid_bias",
    "strategy=ep model.capacity_factor=1.0 model.capacity_group=8",
    "strategy=ep train.micro_batches=2",
    "strategy=ddp strategy.ep=2 model.top_k=1",
]
FOUR = [
    "strategy=ep strategy.ep=4",
    "strategy=ep strategy.ep=4 strategy.ep_dispatch=allgather model.router=sigmoid_bias",
    "strategy=ddp strategy.ep=2",
    "strategy=ep strategy.tp=2",
    "strategy=ep strategy.pp=2 train.micro_batches=2",
    "strategy=ep strategy.cp=2",
    "strategy=zero2 strategy.ep=2 strategy.tp=2",
    "strategy=zero3 strategy.ep=2 strategy.ep_dispatch=allgather",
]


def _extra(layout):
    return tuple(o for o in layout.split() if o.startswith(("model.", "train.micro_batches")))


def _reference(layout, tmp_path):
    extra = _extra(layout)
    return single_reference((*BASE, *extra, f"train.out_dir={tmp_path / ('ref' + '_'.join(extra).replace('=', '-'))}"))


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single(world, tmp_path):
    layouts = TWO if world == 2 else FOUR
    todo = [(layout, ("xtrain", "torch")[i % 2]) for i, layout in enumerate(layouts)]
    configs = [[*BASE, *layout.split(), f"comm={comm}", f"train.out_dir={tmp_path / str(i)}"] for i, (layout, comm) in enumerate(todo)]
    ckpt = tmp_path / "ckpt"
    step5 = f"train.resume={ckpt / 'checkpoints' / 'step_000005'}"
    if world == 2:  # sigmoid_bias: its selection bias (a buffer) is saved, so the resume is exact
        sig = "model.router=sigmoid_bias"
        configs.append([*BASE, "strategy=ep", sig, "train.ckpt_every=5", f"train.out_dir={ckpt}"])
        configs.append([*BASE, "strategy=ddp", "strategy.ep=2", sig, step5, f"train.out_dir={tmp_path / 'again'}"])
    else:  # zero1 ep2 x dp2 (written whole), resumed at ep=4, and consolidated
        configs.append([*BASE, "strategy=zero1", "strategy.ep=2", "train.ckpt_every=5", f"train.out_dir={ckpt}"])
        configs.append([*BASE, "strategy=ep", "strategy.ep=4", step5, f"train.out_dir={tmp_path / 'ep4'}"])
    results = run_many(configs, world, timeout=900)
    aux = {}
    for i, ((layout, comm), got) in enumerate(zip(todo, results)):
        assert_parity(_reference(layout, tmp_path), got, label=f"{layout} comm={comm} world={world}")
        recs = [json.loads(line) for line in (tmp_path / str(i) / "metrics.jsonl").read_text().splitlines()]
        assert all(len(r["moe_tokens_per_expert"]) == 2 and len(r["moe_tokens_per_expert"][0]) == 4 for r in recs)
        if "capacity" in layout:
            assert any(r["moe_dropped_frac"] > 0 for r in recs)
        else:
            assert all(r["moe_dropped_frac"] == 0 for r in recs)
        if not _extra(layout):
            aux[layout] = [r["moe_aux_loss"] for r in recs]
        assert any(k.endswith("@ep") for k in recs[-1]["comm"]), recs[-1]["comm"].keys()
    # the global-batch aux loss is the world size's business no more than the loss is
    ref_dir = tmp_path / "ref"
    ref_aux = [json.loads(line)["moe_aux_loss"] for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    for layout, values in aux.items():
        assert values == pytest.approx(ref_aux, rel=1e-5), layout
    saved, moved = results[len(todo):]
    ref = _reference("model.router=sigmoid_bias" if world == 2 else "", tmp_path)
    assert_parity(ref, saved, label="checkpointed run")
    assert_parity((ref[0][5:], ref[1]), moved, label="resumed at another layout")
    if world == 2:
        assert (ckpt / "checkpoints" / "step_000005" / "buffers.safetensors").is_file()
    else:
        assert_consolidates(ckpt / "checkpoints" / "step_000010", ref[1], tmp_path / "full.safetensors")


def _problems(overrides, world):
    return "\n".join(check_config(compose([*TINY_10_STEPS, *overrides]), world))


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["model=tiny_moe", "strategy=ep", "strategy.ep=4", "model.n_experts=6"], 4, "model.n_experts=6 is not divisible by ep=4"),
        (["strategy=ep"], 2, "strategy.ep=2 needs a mixture-of-experts model"),
        (["model=tiny_moe", "strategy=ep", "strategy.ep=3"], 4, "ep=3 does not divide the data-parallel degree dp=4"),
        (["model=tiny_moe", "strategy=ep", "strategy.ep_dispatch=ring"], 2, "strategy.ep_dispatch='ring' is not one of ['alltoall', 'allgather']"),
        (["model=tiny_moe", "model.top_k=5"], 1, "top_k"),
        (["model=tiny_moe", "model.router=bogus"], 1, "model.router='bogus'"),
        (["model=tiny_moe", "strategy=ep", "strategy.tp=2"], 2, "ep=2 does not divide the data-parallel degree dp=1"),
        (["model=tiny_moe", "strategy=tp", "strategy.sp=true"], 2, "strategy.sp=true with a mixture-of-experts model"),
    ],
)
def test_bad_expert_configs_are_named(overrides, world, message):
    assert message in _problems(overrides, world)
