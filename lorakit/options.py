"""Checks of command-line values that predict and finetune share (usage errors, exit 2)."""

from __future__ import annotations

import math

from .errors import UsageError


def check_finite(values: dict[str, float | None]) -> None:
    """Float options must be finite: nan and inf parse as floats (llama.cpp's std::stof takes them too), and they
    only give NaN results or loops that never end. `values` maps option names to values (None: not given)."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise UsageError(f"{name} must be a finite number, got {v}")


def uint32_seed(seed: int, option: str = "-s/--seed") -> int:
    """llama.cpp's seeds are uint32 and 0xFFFFFFFF (-1) means "from the clock": -1 for that, else the seed as
    llama.cpp stores it (a negative one wraps: -2 is 4294967294). Deviation: llama.cpp's parsers throw on some
    values that fit 32 bits (std::stoi from 2**31 on); lorakit takes -2**31 .. 2**32-1 and refuses the rest."""
    if not -(2**31) <= seed < 2**32:
        raise UsageError(f"{option} {seed}: out of range (a 32-bit seed; -1: random)")
    seed &= 0xFFFFFFFF
    return -1 if seed == 0xFFFFFFFF else seed
