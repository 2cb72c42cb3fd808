import torch

from xtrain.data import batch_offsets, load_stdlib, local_batch, split_micro


def test_stdlib_corpus_is_deterministic_and_split():
    a, b = load_stdlib(), load_stdlib()
    assert len(a.train) > 1_000_000 and len(a.val) > 10_000
    assert (a.train[:1000] == b.train[:1000]).all()
    assert a.vocab_size == 256


def test_batch_depends_only_on_seed_and_step():
    data = load_stdlib()
    x1, y1 = local_batch(data.train, seed=5, step=7, global_batch_size=8, seq_len=16)
    x2, _ = local_batch(data.train, seed=5, step=7, global_batch_size=8, seq_len=16)
    x3, _ = local_batch(data.train, seed=5, step=8, global_batch_size=8, seq_len=16)
    x4, _ = local_batch(data.train, seed=6, step=7, global_batch_size=8, seq_len=16)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens


def test_rank_slices_tile_the_global_batch_for_every_world_size():
    data = load_stdlib()
    kw = dict(seed=0, global_batch_size=24, seq_len=16)
    for step in range(3):
        full_x, full_y = local_batch(data.train, step=step, **kw)
        for dp in (1, 2, 3, 4, 6, 8, 12):
            parts = [local_batch(data.train, step=step, dp_rank=r, dp=dp, **kw) for r in range(dp)]
            assert torch.equal(torch.cat([p[0] for p in parts]), full_x), f"dp={dp}"
            assert torch.equal(torch.cat([p[1] for p in parts]), full_y), f"dp={dp}"
            for mb in (1, 2):
                if (24 // dp) % mb == 0:
                    assert torch.equal(torch.cat(split_micro(parts[0][0], mb)), parts[0][0])


def test_validation_batches_differ_from_training():
    data = load_stdlib()
    o_train = batch_offsets(len(data.val), 0, 0, 4, 16, "train")
    o_val = batch_offsets(len(data.val), 0, 0, 4, 16, "val")
    assert not torch.equal(o_train, o_val)
