"""All of maskkit's randomness: pure functions of (run seed, epoch, sample index, stream), vectorised.

A sample's crop, its mask, its second view or its text mask must not depend on the batch it lands in,
the number of ranks, or whether the run was resumed. So nothing here draws from a global generator:
every random number is a counter-based hash (splitmix64, Steele et al. 2014) of

    key(run seed, epoch, sample index)   one 64-bit key per sample, `sample_keys`
    stream                               what the numbers are for, `Stream`
    position                             which of the sample's numbers, 0, 1, 2, ...

computed as a handful of integer tensor ops on the batch's own device: no Python loop over samples, no
generator per sample, no host-to-device copy. The ops are int64 arithmetic that wraps modulo 2^64 (as
splitmix64 needs) on every backend; `tests/test_rng.py` checks them bit for bit against a pure-Python
reference, and `benchmarks/rng.py` times them next to `torch.rand` of the same shape.
"""

import functools
import math
from enum import IntEnum

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


class Stream(IntEnum):
    """What a draw is for. Each stream gives independent numbers for the same sample."""

    ORDER = 1          # the sampler's permutation of epoch e (sample index -1)
    CROP = 2           # random resized crop and flip of the first view
    SECOND_VIEW = 3    # the second view of two-view methods (MoCo, DenseCL)
    MASK = 4           # which image patches are masked or dropped (MAE, FLIP)
    TEXT_MASK = 5      # which tokens are masked (PMLM, text token dropping)
    PERMUTATION = 6    # a factorisation order (XLNet, PMLM)
    CORRUPTION = 7     # energy-based pretraining's corruptions
    PHOTO = 8          # which crop of which photo a `photos` item is (fixed, epoch 0)
    SCENE = 9          # what a generated shapes-world image shows (fixed per item)
    CORRUPTION_KIND = 10   # which corruption a sample gets under energy pretraining's "mix"
    COLOR = 11         # colour jitter, grayscale and blur of the first view (MoCo v2 augmentation)
    SECOND_COLOR = 12  # the same for the second view


# Python reference (also used for the few scalar seeds: a run's order, a photo crop).


def mix(x: int) -> int:
    """splitmix64's output function of a state that has already been advanced."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The 64-bit key of one sample (a Python int in [0, 2^64))."""
    x = mix(seed + _GOLDEN)
    for part in (epoch, index):
        x = mix((x ^ (part & _MASK64)) + _GOLDEN)
    return x


def stream_key(key: int, stream: int) -> int:
    return mix((key ^ (int(stream) * _GOLDEN & _MASK64)) + _GOLDEN)


def scalar_seed(seed: int, epoch: int, index: int, stream: Stream) -> int:
    """A 63-bit seed for a torch.Generator (for whole-data-set draws such as an epoch's permutation)."""
    return stream_key(sample_key(seed, epoch, index), stream) >> 1


# Vectorised: the same functions on int64 tensors (bits reinterpreted as signed, arithmetic wrapping).


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _signed(_MUL1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MUL2)
    return x ^ _shift_right(x, 31)


@torch.compiler.disable
def sample_keys(seed: int, epoch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B,) int64 keys of samples (epoch[b], index[b]) of the run `seed`, on their device."""
    x = torch.full_like(index, _signed(mix(seed + _GOLDEN)), dtype=torch.int64)
    for part in (epoch, index):
        x = _mix((x ^ part.to(torch.int64)) + _signed(_GOLDEN))
    return x


@functools.lru_cache(maxsize=16)
def _weyl(count: int, device: torch.device) -> torch.Tensor:
    """(count,) int64: (j + 1) * golden gamma, splitmix64's state increments for positions j = 0 .. count-1."""
    return torch.arange(1, count + 1, device=device, dtype=torch.int64) * _signed(_GOLDEN)


def _mix_(x: torch.Tensor, scratch: torch.Tensor, top_bits: int = 64) -> torch.Tensor:
    """`_mix` in place (x and scratch of one shape): a third of the time of the allocating version.

    Only the top `top_bits` bits are exact: the last step, x ^= x >> 31, changes bits 0-32 alone, so
    it is skipped when no more than the top 31 bits are wanted (a float32 takes 24).
    """
    rounds = ((30, _MUL1), (27, _MUL2)) if top_bits <= 31 else ((30, _MUL1), (27, _MUL2), (31, None))
    for bits, multiplier in rounds:
        torch.bitwise_right_shift(x, bits, out=scratch)
        scratch.bitwise_and_((1 << (64 - bits)) - 1)
        x.bitwise_xor_(scratch)
        if multiplier is not None:
            x.mul_(_signed(multiplier))
    return x


# Eager under torch.compile (train.compile): inductor cannot index with splitmix64's 64-bit constants once a shape
# is symbolic ("too big to convert to int64_t"), the cached buffers are not traceable, and the hash is cheap.
@torch.compiler.disable
def uniform(keys: torch.Tensor, shape: tuple[int, ...], stream: Stream, dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) uniform numbers in [0, 1): row b depends only on (keys[b], stream), on keys' device.

    Position j of row b is splitmix64's (j+1)-th output from the state stream_key(keys[b], stream); the
    top 24 (float32) or 53 (float64) bits become the number, so 0 can occur and 1 cannot.
    """
    count = math.prod(shape)
    mantissa = 53 if dtype == torch.float64 else 24
    state = _mix((keys ^ _signed(int(stream) * _GOLDEN & _MASK64)) + _signed(_GOLDEN))      # (B,)
    steps = _weyl(count, keys.device)[None, :]                                            # (1, count)
    out = torch.empty(len(keys), count, dtype=dtype, device=keys.device)
    # On the CPU, blocks of rows small enough to stay in cache (and reused buffers, since fresh ones cost
    # more in page faults than the hashing); a GPU takes the whole batch at once.
    rows = len(keys) if keys.device.type != "cpu" else max(1, _CPU_BLOCK // count)
    bits, scratch = _buffers(min(rows, len(keys)), count, keys.device)
    for start in range(0, len(keys), rows):
        stop = min(len(keys), start + rows)
        block, spare = bits[: stop - start], scratch[: stop - start]
        torch.add(state[start:stop, None], steps, out=block)
        _mix_(block, spare, top_bits=mantissa)
        torch.bitwise_right_shift(block, 64 - mantissa, out=spare)
        spare.bitwise_and_((1 << mantissa) - 1)
        out[start:stop].copy_(spare).mul_(2.0**-mantissa)      # exact: the value has `mantissa` bits
    return out.reshape(len(keys), *shape)


_CPU_BLOCK = 131072   # int64 elements per block: 1 MB per buffer


@functools.lru_cache(maxsize=4)
def _buffers(rows: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int64 work buffers, kept between calls; only `uniform` writes them, and it returns a new tensor."""
    return (torch.empty(rows, count, dtype=torch.int64, device=device),
            torch.empty(rows, count, dtype=torch.int64, device=device))
