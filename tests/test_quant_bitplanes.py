"""Bitplane layout planes-v1: the documented example byte for byte, round trips, independent packing."""

import numpy as np
import pytest
import torch

from bitdial.quant.bitplanes import pack_planes, row_bytes, unpack_planes

# The worked example of docs/bitplanes.md: 2 rows x 10 columns, B = 4.
DOC_CODES = torch.tensor([[0, 15, 9, 6, 3, 12, 5, 10, 15, 0],
                          [7, 1, 15, 0, 11, 4, 13, 2, 0, 15]], dtype=torch.uint8)
DOC_PLANES = [  # [plane][row] = (byte 0 = columns 0..7, byte 1 = columns 8..9), written out by hand
    [[0b10100110, 0b00000001], [0b01010100, 0b00000010]],  # plane 0: bit 3 (MSB)
    [[0b01101010, 0b00000001], [0b01100101, 0b00000010]],  # plane 1: bit 2
    [[0b10011010, 0b00000001], [0b10010101, 0b00000010]],  # plane 2: bit 1
    [[0b01010110, 0b00000001], [0b01010111, 0b00000010]],  # plane 3: bit 0 (LSB)
]
DOC_BYTES_HEX = "A6 01 54 02 6A 01 65 02 9A 01 95 02 56 01 57 02"  # the array in memory order
DOC_CODES_2BIT = [[0, 3, 2, 1, 0, 3, 1, 2, 3, 0],
                  [1, 0, 3, 0, 2, 1, 3, 0, 0, 3]]


def test_doc_example_byte_for_byte():
    planes = pack_planes(DOC_CODES, 4)
    assert planes.dtype == torch.uint8 and tuple(planes.shape) == (4, 2, 2)
    assert planes.tolist() == DOC_PLANES
    assert bytes(planes.contiguous().numpy().tobytes()) == bytes.fromhex(DOC_BYTES_HEX)
    assert unpack_planes(planes, 2, 10).tolist() == DOC_CODES_2BIT
    assert unpack_planes(planes[:2], 2, 10).tolist() == DOC_CODES_2BIT  # the first two planes suffice
    assert unpack_planes(planes, 1, 10).tolist() == [[0, 1, 1, 0, 0, 1, 0, 1, 1, 0],
                                                     [0, 0, 1, 0, 1, 0, 1, 0, 0, 1]]
    assert torch.equal(unpack_planes(planes, 4, 10), DOC_CODES)


def _numpy_pack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Straight transcription of the layout, one bit at a time."""
    N, K = codes.shape
    out = np.zeros((bits, N, (K + 7) // 8), dtype=np.uint8)
    for p in range(bits):
        for n in range(N):
            for col in range(K):
                bit = (int(codes[n, col]) >> (bits - 1 - p)) & 1
                out[p, n, col // 8] |= bit << (col % 8)
    return out


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 8), (5, 17), (1, 9)])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_pack_matches_bitwise_reference(shape, bits):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    assert np.array_equal(pack_planes(codes, bits).numpy(), _numpy_pack_reference(codes.numpy(), bits))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 17), (4, 16), (7, 129), (9, 576)])
def test_round_trip_every_k_and_b(shape):
    N, K = shape
    g = torch.Generator().manual_seed(N * 1000 + K)
    for B in range(1, 9):
        codes = torch.randint(0, 1 << B, shape, generator=g, dtype=torch.uint8)
        planes = pack_planes(codes, B)
        assert tuple(planes.shape) == (B, N, row_bytes(K))
        for k in range(1, B + 1):
            view = unpack_planes(planes, k, K)
            assert view.dtype == torch.uint8
            assert torch.equal(view, codes >> (B - k)), (B, k)
            assert torch.equal(unpack_planes(planes[:k].clone(), k, K), view)
        if K % 8:  # padding bits of the last byte are zero in every plane
            assert int((planes[:, :, -1] >> (K % 8)).max()) == 0


def test_extreme_codes():
    codes = torch.tensor([[255] * 13, [0] * 13, [128, 127] * 6 + [1]], dtype=torch.uint8)
    planes = pack_planes(codes, 8)
    assert planes[:, 0].tolist() == [[255, 31]] * 8  # 13 ones: 8 + 5 bits, padding zero
    assert planes[:, 1].tolist() == [[0, 0]] * 8
    for k in range(1, 9):
        assert torch.equal(unpack_planes(planes, k, 13), codes >> (8 - k))


def test_bad_inputs():
    with pytest.raises(ValueError):
        pack_planes(torch.tensor([[4]], dtype=torch.uint8), 2)  # 4 needs 3 bits
    with pytest.raises(TypeError):
        pack_planes(torch.tensor([[1]], dtype=torch.int64), 2)
    with pytest.raises(ValueError):
        pack_planes(torch.zeros(2, 2, 2, dtype=torch.uint8), 2)
    planes = pack_planes(torch.zeros(2, 10, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        unpack_planes(planes, 4, 10)  # only 3 planes
    with pytest.raises(ValueError):
        unpack_planes(planes, 2, 17)  # 17 columns need 3 bytes per row
