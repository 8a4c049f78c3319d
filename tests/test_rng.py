"""The counter-based generator: bit-exact against a pure-Python splitmix64, per-sample, uniform."""

import pytest
import torch

from maskkit import rng
from maskkit.rng import Stream

MASK64 = (1 << 64) - 1


def reference_uniform(key: int, count: int, stream: int, mantissa: int = 24) -> list[float]:
    """splitmix64 written out in Python integers: the state advances by the golden gamma, then is mixed."""
    state = rng.stream_key(key, stream)
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        out.append((rng.mix(state) >> (64 - mantissa)) * 2.0**-mantissa)
    return out


def test_splitmix64_reference_values():
    """mix(x + gamma) from state 0 gives splitmix64's published first outputs (seed 0)."""
    gamma, state, outputs = 0x9E3779B97F4A7C15, 0, []
    for _ in range(3):
        state = (state + gamma) & MASK64
        outputs.append(rng.mix(state))
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@pytest.mark.parametrize("dtype, mantissa", [(torch.float32, 24), (torch.float64, 53)])
def test_vectorised_draws_equal_the_python_reference_bit_for_bit(dtype, mantissa):
    epochs = torch.tensor([0, 0, 3, 7, 2**40])
    indices = torch.tensor([0, 1, 5, -1, 123456789])
    keys = rng.sample_keys(11, epochs, indices)
    for b in range(len(keys)):
        assert int(keys[b]) & MASK64 == rng.sample_key(11, int(epochs[b]), int(indices[b]))
    draws = rng.uniform(keys, (3, 4), Stream.MASK, dtype=dtype)
    assert draws.shape == (5, 3, 4) and draws.dtype == dtype
    for b in range(len(keys)):
        expected = reference_uniform(int(keys[b]) & MASK64, 12, Stream.MASK, mantissa)
        assert draws[b].flatten().tolist() == expected


def test_a_sample_draws_the_same_numbers_in_any_batch():
    keys = rng.sample_keys(0, torch.zeros(6, dtype=torch.long), torch.arange(6))
    full = rng.uniform(keys, (8,), Stream.CROP)
    assert torch.equal(rng.uniform(keys[[4, 1]], (8,), Stream.CROP), full[[4, 1]])
    # Each of seed, epoch, index and stream changes the numbers.
    variants = [
        full[2],
        rng.uniform(rng.sample_keys(1, torch.tensor([0]), torch.tensor([2])), (8,), Stream.CROP)[0],
        rng.uniform(rng.sample_keys(0, torch.tensor([1]), torch.tensor([2])), (8,), Stream.CROP)[0],
        full[3],
        rng.uniform(keys[2:3], (8,), Stream.MASK)[0],
    ]
    assert len({tuple(v.tolist()) for v in variants}) == len(variants)
    # Swapping epoch and index gives another sample.
    swapped = rng.sample_keys(5, torch.tensor([1, 2]), torch.tensor([2, 1]))
    assert swapped[0] != swapped[1]


def test_draws_are_uniform_and_independent_enough():
    keys = rng.sample_keys(3, torch.zeros(512, dtype=torch.long), torch.arange(512))
    u = rng.uniform(keys, (256,), Stream.MASK, dtype=torch.float64)
    assert 0.0 <= u.min() and u.max() < 1.0
    histogram = torch.histc(u.float(), bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    chi_square = float(((histogram - expected) ** 2 / expected).sum())
    assert chi_square < 45            # 15 degrees of freedom: p < 1e-4 above ~43
    # Neighbouring positions and neighbouring samples are uncorrelated.
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(correlation)) < 0.01


def test_scalar_seeds_fit_a_torch_generator():
    seeds = {rng.scalar_seed(0, epoch, -1, Stream.ORDER) for epoch in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))


def test_blocks_of_rows_on_the_cpu_do_not_change_the_numbers():
    """The CPU path hashes blocks of rows (131072 numbers at a time); rows across block edges are the same."""
    keys = rng.sample_keys(2, torch.zeros(1000, dtype=torch.long), torch.arange(1000))
    whole = rng.uniform(keys, (300,), Stream.MASK, dtype=torch.float64)        # 436 rows per block
    for b in (0, 435, 436, 437, 872, 999):
        assert torch.equal(rng.uniform(keys[b : b + 1], (300,), Stream.MASK, dtype=torch.float64)[0], whole[b])
