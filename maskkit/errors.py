"""The one exception type maskkit raises for problems a user can fix."""

import math


class MaskkitError(Exception):
    """A user-facing error: the message names the file, key or shape at fault and what would fix it.

    The CLI prints it on one line and exits non-zero; `--debug` shows the traceback.
    """


def require(ok: bool, source: str, key: str, value, valid: str) -> None:
    """Raise `SOURCE: KEY must be VALID, got VALUE` unless `ok`."""
    if not ok:
        raise MaskkitError(f"{source}: {key} must be {valid}, got {value!r}")


def require_int(source: str, key: str, value: int, low: int, high: int | None = None) -> None:
    valid = f"at least {low}" if high is None else f"an integer in [{low}, {high}]"
    require(low <= value and (high is None or value <= high), source, key, value, valid)


def require_float(source: str, key: str, value: float, low: float, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False) -> None:
    """A finite number in the interval; NaN and infinities always fail (every comparison with NaN is False)."""
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    if high == math.inf:
        valid = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        valid = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    require(math.isfinite(value) and above and below, source, key, value, valid)
