"""Eager LoRA references: the executable specification of dlcore's LoRA ops, written the way peft's
``lora.Linear`` computes them (float64-capable).

Single adapter (peft's ``Linear.forward``)::

    y = x @ W.T + b + scaling * lora_B(lora_A(dropout(x)))

with ``W`` (out, in), or (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D layout), ``lora_A``
(r, in) and ``lora_B`` (out, r). Multi-adapter (peft's ``_mixed_batch_forward``): row i of the
flattened ``x`` uses adapter ``indices[i]`` of stacks ``A`` (n, r_max, in) and ``B``
(n, out, r_max) zero-padded to the largest rank; index -1 means the base layer only.

Dropout is counter-based so every backend draws the same mask and backward regenerates it instead
of storing it: element (i, k) of the flattened ``x`` (tokens, in) is kept iff
``philox(seed, i * in + k) >> 8 >= round(p * 2**24)``, where ``philox`` is Triton's
``tl.randint`` (Philox4x32-10, counter = (offset lo, offset hi, 0, 0), key = (seed lo, seed hi)),
and kept elements are scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a < 2**32 in int64 and a 32-bit constant b,
    split so that no partial product overflows int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randint(seed, offsets)`` for int64 offsets, as int64 values in [0, 2**32)."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """Elements whose 24-bit draw is below this are dropped (probability p up to 2**-24)."""
    return int(round(p * (1 << 24)))


def dropout_keep_mask(
    seed: int, row_start: int, rows: int, cols: int, p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Keep mask (rows, cols) of rows ``row_start ..`` of a (tokens, cols) input."""
    r = torch.arange(row_start, row_start + rows, device=device, dtype=torch.int64)
    c = torch.arange(cols, device=device, dtype=torch.int64)
    draws = philox_randint(seed, r[:, None] * cols + c[None, :])
    return (draws >> 8) >= dropout_threshold(p)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Counter-based inverted dropout of ``x`` (any leading dims), as every backend draws it."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    x2 = x.reshape(-1, x.shape[-1])
    keep = dropout_keep_mask(seed, 0, x2.shape[0], x2.shape[1], p, x.device)
    return (x2 * keep.to(x.dtype) / (1.0 - p)).reshape(x.shape)


def _base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fifo: bool):
    return torch.nn.functional.linear(x, weight.t() if fifo else weight, bias)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` for one active adapter (dropout counter-based)."""
    result = _base(x, weight, bias, fan_in_fan_out)
    xd = lora_dropout(x, dropout_p, seed)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)
    return result + lora * scaling


def lora_linear_multi_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    indices: torch.Tensor,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """peft's ``_mixed_batch_forward`` with one adapter per row of the flattened ``x``."""
    result = _base(x, weight, bias, fan_in_fan_out)
    x2 = x.reshape(-1, x.shape[-1])
    out = result.reshape(-1, result.shape[-1])
    idx = indices.reshape(-1)
    pieces = []
    for a in torch.unique(idx).tolist():
        if a < 0:
            continue
        rows = (idx == a).nonzero().squeeze(1)
        lora = torch.nn.functional.linear(
            torch.nn.functional.linear(x2[rows], lora_A[a]), lora_B[a]
        )
        pieces.append((rows, lora * scalings[a].to(lora.dtype)))
    # Out of place so autograd flows into every adapter's slice.
    for rows, lora in pieces:
        out = out.index_add(0, rows, lora)
    return out.reshape(result.shape)
