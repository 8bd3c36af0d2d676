"""Bit packing of integer codes: b-bit values (b in 2, 3, 4, 8) into bytes, eight values in b bytes.

Eight b-bit codes make one 8b-bit word (code i at bits b*i..b*i+b-1, little-endian), written as b bytes; so
int4 is two codes per byte (low nibble first), int2 four per byte, int3 eight codes in three bytes, int8 one.
The packed size is ceil(n / 8) * b bytes (n for int8): bits/8 of a byte per code.
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take packed (int8: one byte each, no padding)."""
    return n if bits == 8 else -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """A flat uint8 tensor holding `codes` (integers in [0, 2^bits)) packed at `bits` bits each."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes; implemented: 2, 3, 4, 8")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)                       # one 8*bits-bit word per eight codes
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n codes (uint8) of a tensor written by pack(..., bits)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"cannot unpack {bits}-bit codes; implemented: 2, 3, 4, 8")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:n].clone()
    mask = (1 << bits) - 1
    if bits in (2, 4):  # whole codes per byte, low bits first: shift bytes in uint8 (the hot path of every forward)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((flat[:, None] >> shifts) & mask).reshape(-1)[:n]
    b = flat.to(torch.int32).view(-1, bits)  # int3: three bytes make one 24-bit word of eight codes
    words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    shifts = torch.arange(8, dtype=torch.int32) * bits
    return ((words[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1)[:n]
