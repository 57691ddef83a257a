"""Bit packing of signed integer weight codes (pure functions, no file I/O).

Layout of a packed tensor of ``b``-bit signed codes (two's complement):

* ``b == 8``  -> ``int8``, one code per byte;
* ``b == 16`` -> ``int16`` (little-endian on disk, as safetensors stores it);
* any other ``b`` -> ``uint8`` dense LSB-first bitstream: code ``i`` occupies bits
  ``[i*b, (i+1)*b)`` of the stream, bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``.
  For ``b == 4`` this is exactly "two codes per byte, lower nibble first"; for 2/3/5/6/7 bits it
  keeps the file at the size the bit allocation assumed (``numel * b / 8`` bytes, rounded up).
"""

from __future__ import annotations

import numpy as np
import torch

from hawq import HawqError
from hawq.bitmap import MAX_BITS, MIN_BITS


def code_range(bits: int) -> tuple[int, int]:
    """Inclusive range of a signed ``bits``-bit two's complement integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packing_layout(bits: int) -> str:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise HawqError(f"cannot pack {bits}-bit codes: bits must be in {MIN_BITS}..{MAX_BITS}")
    return {8: "int8", 16: "int16"}.get(bits, "bitstream_lsb")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes the packed codes occupy: ``ceil(numel * bits / 8)``."""
    packing_layout(bits)
    return (numel * bits + 7) // 8


def packed_dtype(bits: int) -> torch.dtype:
    return {"int8": torch.int8, "int16": torch.int16, "bitstream_lsb": torch.uint8}[packing_layout(bits)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``codes`` (any integer dtype, values in the signed ``bits``-bit range) and pack them."""
    layout = packing_layout(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise HawqError(f"pack_codes: expected integer codes, got {codes.dtype}")
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    lo, hi = code_range(bits)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise HawqError(f"pack_codes: codes span [{int(flat.min())}, {int(flat.max())}], "
                        f"outside the signed {bits}-bit range [{lo}, {hi}]")
    if layout == "int8":
        return flat.to(torch.int8)
    if layout == "int16":
        return flat.to(torch.int16)
    unsigned = flat.numpy() & ((1 << bits) - 1)  # two's complement in b bits
    bit_planes = ((unsigned[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    packed = np.packbits(bit_planes.reshape(-1), bitorder="little")
    return torch.from_numpy(packed)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a flat ``int32`` tensor of ``numel`` signed codes."""
    layout = packing_layout(bits)
    expected_dtype = packed_dtype(bits)
    if packed.dtype != expected_dtype:
        raise HawqError(f"unpack_codes: {bits}-bit codes must be stored as {expected_dtype}, "
                        f"got {packed.dtype}")
    expected = numel if layout != "bitstream_lsb" else packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise HawqError(f"unpack_codes: {numel} codes of {bits} bits need {expected} elements, "
                        f"got {packed.numel()}")
    if layout != "bitstream_lsb":
        return packed.reshape(-1).to(torch.int32)
    stream = np.unpackbits(packed.reshape(-1).cpu().numpy(), count=numel * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))
    unsigned = (stream.reshape(numel, bits).astype(np.int64) * weights).sum(axis=1)
    signed = np.where(unsigned >= (1 << (bits - 1)), unsigned - (1 << bits), unsigned)
    return torch.from_numpy(signed.astype(np.int32))
