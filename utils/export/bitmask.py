"""The bitmask layout of a sparse matrix: its non-zeros in row-major order and one bit per weight.

    parts = compress_matrix(weight)         # {"compressed": values, "bitmask": uint8, "shape": int64}
    dense = decompress_matrix(**parts)      # bit for bit the weight again

Pure tensor math: no files, no models.  The layout is the one compressed-tensors' `sparse-bitmask`
used (see utils/export/compressed.py for why we write it ourselves).
"""
from __future__ import annotations

import torch

BITS_PER_BYTE = 8


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool → (rows, ceil(cols / 8)) uint8; bit i of byte j is column 8j + i
    (little-endian in the byte, as numpy.packbits(bitorder="little")), each row padded on its own."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // BITS_PER_BYTE) * BITS_PER_BYTE, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = (1 << torch.arange(BITS_PER_BYTE, dtype=torch.uint8, device=mask.device))
    return (padded.view(rows, -1, BITS_PER_BYTE) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_bitmask: (rows, bytes) uint8 → (rows, cols) bool."""
    bits = torch.arange(BITS_PER_BYTE, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :cols]


def compress_matrix(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D tensor → its non-zeros in row-major order, the packed bitmask and the shape."""
    mask = weight != 0
    return {"compressed": weight[mask], "bitmask": pack_bitmask(mask),
            "shape": torch.tensor(weight.shape, dtype=torch.int64)}


def decompress_matrix(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    rows, cols = (int(size) for size in shape.tolist())
    mask = unpack_bitmask(bitmask, cols)
    if int(mask.sum()) != compressed.numel():
        raise ValueError(f"bitmask holds {int(mask.sum())} ones for {compressed.numel()} values")
    dense = torch.zeros(rows, cols, dtype=compressed.dtype, device=compressed.device)
    dense[mask] = compressed
    return dense


def pays_to_compress(tensor: torch.Tensor) -> bool:
    """Whether values + bitmask take fewer bytes than the dense tensor (density below 1 - 1/(8·itemsize):
    93.8% in bf16): the pruned linears, never an embedding or a norm."""
    if tensor.ndim != 2 or not tensor.is_floating_point():
        return False
    nonzero = int(torch.count_nonzero(tensor))
    sparse_bytes = nonzero * tensor.element_size() + tensor.shape[0] * -(-tensor.shape[1] // BITS_PER_BYTE)
    return sparse_bytes < tensor.numel() * tensor.element_size()
