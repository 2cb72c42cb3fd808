"""One block of attention with its log-sum-exp, forward and backward, and the
fp32 merge of partial results: what ring and all-gather context parallelism
compute per block.

For queries q (B,H,Tq,E) and keys/values k, v (B,K,Tk,E) (K kv heads shared by
H/K query heads each, grouped as ``repeat_interleave``), a block returns
out = softmax(s) v and lse = log Σ_j exp(s_j), s = q kᵀ·scale (causal: the
top-left-aligned lower triangle, used only for square diagonal blocks).

Kernels, by device: on CPU torch's flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``, which takes grouped kv heads
and returns lse); on CUDA the memory-efficient kernel (fp32-capable, returns
lse; kv heads repeated for it), checked once against the plain math on a small
case and dropped for the math if it disagrees; elsewhere, or with
``kernel="math"``, plain math over the block (a Tq × Tk score matrix, never
T × T).

Backward uses the final (merged) out and lse, as FlashAttention-2 does per
tile (Dao, 2023, arXiv:2307.08691): P = exp(s − lse), D = rowsum(dO ∘ O),
dS = P ∘ (dO vᵀ − D), so every block's gradients are exact for the whole row.

Merge (ring-flash-attention's stable form, in fp32):
lse' = lse + log(1 + exp(lse_b − lse)), out' = out − σ(lse_b − lse)·(out − out_b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("auto", "math")
_cuda_ok: dict[tuple, bool] = {}


def _repeat_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _fold_kv(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated kv heads back onto their K heads."""
    B, H, T, E = t.shape
    return t if H == kv_heads else t.view(B, kv_heads, H // kv_heads, T, E).sum(2)


def _kind(q: torch.Tensor, kernel: str) -> str:
    if kernel in ("math", "cuda_efficient"):  # "cuda_efficient": forced, by the probe
        return kernel
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.device.type == "cuda":
        key = (q.device.index, q.dtype)
        if key not in _cuda_ok:
            _cuda_ok[key] = _probe_cuda(q.device, q.dtype)
        return "cuda_efficient" if _cuda_ok[key] else "math"
    return "math"


# -- forward ------------------------------------------------------------------------


def attend(q, k, v, causal: bool, scale: float, kernel: str = "auto"):
    """(out in q's dtype, lse in fp32) of one block."""
    kind = _kind(q, kernel)
    if kind == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    if kind == "cuda_efficient":
        rep = q.shape[1] // k.shape[1]
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, _repeat_kv(k, rep), _repeat_kv(v, rep), None, True, 0.0, causal, scale=scale
        )
        return out, lse[..., : q.shape[2]].float()
    return _math_forward(q, k, v, causal, scale)


def _scores(q, k, causal, scale):
    s = torch.matmul(q.float(), _repeat_kv(k, q.shape[1] // k.shape[1]).float().transpose(-1, -2)) * scale
    if causal:
        Tq, Tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _math_forward(q, k, v, causal, scale):
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, _repeat_kv(v, q.shape[1] // k.shape[1]).float())
    return out.to(q.dtype), lse


# -- backward -----------------------------------------------------------------------


def attend_backward(dout, q, k, v, out, lse, causal: bool, scale: float, kernel: str = "auto"):
    """(dq, dk, dv) of one block, from the final out and lse of its query rows
    (dk, dv over the K kv heads)."""
    kind = _kind(q, kernel)
    if kind == "cpu_flash":
        lse = lse if q.dtype == torch.float64 else lse.float()
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal, scale=scale
        )
    if kind == "cuda_efficient":
        rep, K = q.shape[1] // k.shape[1], k.shape[1]
        pad = (-lse.shape[-1]) % 32
        lse_p = F.pad(lse, (0, pad)) if pad else lse
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.to(q.dtype).contiguous(), q, _repeat_kv(k, rep), _repeat_kv(v, rep), None,
            out.to(q.dtype).contiguous(), lse_p.contiguous(), torch.zeros((), dtype=torch.int64, device=q.device),
            torch.zeros((), dtype=torch.int64, device=q.device), 0.0, [True, True, True, False], causal, scale=scale,
        )
        return dq, _fold_kv(dk, K), _fold_kv(dv, K)
    return _math_backward(dout, q, k, v, out, lse, causal, scale)


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    K, rep = k.shape[1], q.shape[1] // k.shape[1]
    s = _scores(q, k, causal, scale)
    p = torch.exp(s - lse.float().unsqueeze(-1))
    dout32 = dout.float()
    kr, vr = _repeat_kv(k, rep).float(), _repeat_kv(v, rep).float()
    dv = torch.matmul(p.transpose(-1, -2), dout32)
    dp = torch.matmul(dout32, vr.transpose(-1, -2))
    delta = (dout32 * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kr)
    dk = torch.matmul(ds.transpose(-1, -2), q.float())
    return dq.to(q.dtype), _fold_kv(dk, K).to(k.dtype), _fold_kv(dv, K).to(v.dtype)


# -- whole-sequence causal attention in tiles (Ulysses' local step) --------------------


def uses_math(q, kernel: str) -> bool:
    """Whether blocks on ``q``'s device run as plain math (which materializes scores)."""
    return _kind(q, kernel) == "math"


def attend_causal_tiled(q, k, v, tiles: int, scale: float, kernel: str = "auto"):
    """Causal attention over the whole sequence as ``tiles`` × ``tiles`` blocks
    (query tile i against key tiles j <= i, merged through the lse), so the
    math path never holds more than a (T/tiles)² score block."""
    if tiles == 1:  # a fused kernel tiles by itself
        return attend(q, k, v, True, scale, kernel)
    T = q.shape[2]
    c = T // tiles
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for i in range(tiles):
        rows = slice(i * c, (i + 1) * c)
        for j in range(i + 1):
            cols = slice(j * c, (j + 1) * c)
            o_b, l_b = attend(q[:, :, rows].contiguous(), k[:, :, cols].contiguous(), v[:, :, cols].contiguous(), i == j, scale, kernel)
            if j == 0:
                out[:, :, rows].copy_(o_b)
                lse[:, :, rows].copy_(l_b)
            else:
                merge_(out[:, :, rows], lse[:, :, rows], o_b, l_b)
    return out.to(q.dtype), lse


def attend_causal_tiled_backward(dout, q, k, v, out, lse, tiles: int, scale: float, kernel: str = "auto"):
    """The backward of ``attend_causal_tiled``, block by block from the final out and lse."""
    if tiles == 1:
        return attend_backward(dout, q, k, v, out, lse, True, scale, kernel)
    T = q.shape[2]
    c = T // tiles
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for i in range(tiles):
        rows = slice(i * c, (i + 1) * c)
        for j in range(i + 1):
            cols = slice(j * c, (j + 1) * c)
            g = attend_backward(dout[:, :, rows].contiguous(), q[:, :, rows].contiguous(), k[:, :, cols].contiguous(),
                                v[:, :, cols].contiguous(), out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(),
                                i == j, scale, kernel)
            dq[:, :, rows] += g[0]
            dk[:, :, cols] += g[1]
            dv[:, :, cols] += g[2]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- merge ----------------------------------------------------------------------------


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a block's (out_b, lse_b) into the running fp32 (out, lse), in place."""
    d = (lse_b - lse).unsqueeze(-1)
    out.sub_(torch.sigmoid(d) * (out - out_b.float()))
    lse.sub_(F.logsigmoid(lse - lse_b))


def _probe_cuda(device, dtype) -> bool:
    """Whether the CUDA efficient kernel agrees with the math on a small GQA case."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 4, 64, 16, device=device, dtype=dtype, generator=g) for _ in range(3))
        k, v = k[:, :2], v[:, :2]
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for causal in (True, False):
            o, lse = attend(q, k, v, causal, 0.25, kernel="cuda_efficient")
            o2, lse2 = _math_forward(q, k, v, causal, 0.25)
            ok = torch.allclose(o.float(), o2.float(), atol=tol) and torch.allclose(lse, lse2, atol=tol)
            do = torch.randn_like(o)
            g1 = attend_backward(do, q, k, v, o2, lse2, causal, 0.25, kernel="cuda_efficient")
            g2 = _math_backward(do, q, k, v, o2, lse2, causal, 0.25)
            ok = ok and all(torch.allclose(a.float(), b.float(), atol=tol * 10) for a, b in zip(g1, g2))
            if not ok:
                return False
        return True
    except Exception:  # noqa: BLE001 - a kernel missing on this build: use the math
        return False
