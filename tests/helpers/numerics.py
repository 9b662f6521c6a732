"""Tolerances for fp32 results that two computations of the same function reach by sums in another order."""
from __future__ import annotations

import torch

# fp32 sums in another order differ by a fraction of the terms' scale, not by a fixed amount: CLIP's positional
# embedding's gradient (entries up to 49) differed by 2.2e-5 on an AMD Zen 5 machine, 4e-7 of its largest entry,
# where the AMX machine's rounding stayed under 1e-5. 2e-6 is five times that measured fraction.
REORDER_FRACTION = 2e-6


def reorder_atol(expected: torch.Tensor, floor: float) -> float:
    """An absolute tolerance for a tensor that should equal ``expected`` up to fp32 summation order: ``floor`` plus
    ``REORDER_FRACTION`` of ``expected``'s largest magnitude."""
    return floor + REORDER_FRACTION * expected.abs().max().item()
