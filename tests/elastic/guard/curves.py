"""Synthetic training curves for the guard tests: seeded, plain floats, like real runs.

Loss ~ a + b / sqrt(step) with multiplicative Gaussian noise; grad norm drifts slowly with
lognormal noise. Pure functions of (seed, step) so a test can build the same curve twice.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    step: int
    loss: float
    grad_norm: float


def healthy_curve(
    *,
    seed: int,
    num_steps: int,
    loss_noise: float = 0.02,
    grad_sigma: float = 0.2,
    start_step: int = 0,
) -> list[Point]:
    """A decaying, noisy loss and a lognormal-ish grad norm (``num_steps`` points)."""
    rng = random.Random(seed)
    points = []
    for step in range(start_step, start_step + num_steps):
        loss = (2.0 + 6.0 / math.sqrt(step + 1)) * (1.0 + loss_noise * rng.gauss(0.0, 1.0))
        grad = (0.5 + 1.5 / math.sqrt(step + 1)) * math.exp(grad_sigma * rng.gauss(0.0, 1.0))
        points.append(Point(step, loss, grad))
    return points


def lr_blowup(points: list[Point], *, start_step: int, growth: float = 1.25) -> list[Point]:
    """From ``start_step`` the grad norm grows geometrically and the loss follows a few steps
    later (GLM-130B: the grad-norm spike precedes the loss collapse)."""
    out = []
    for p in points:
        k = p.step - start_step
        if k < 0:
            out.append(p)
            continue
        grad = p.grad_norm * growth**k
        loss = p.loss * (1.0 + 0.02 * max(0, k - 3) ** 1.5)
        out.append(Point(p.step, loss, grad))
    return out
