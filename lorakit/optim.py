"""llama.cpp's AdamW hyperparameters and learning-rate schedule, as pure functions of the step.

All arithmetic in float32 as in common/train.cpp (spec §4.3):
  step < warmup:          s = step / warmup
  restarts enabled:       s = cosdecay_restart(step - warmup)
  otherwise:              s = cosdecay(step)          (quirk: the raw step, not step - warmup)
  cosdecay(s, C, mu) = (1 - mu) * 0.5 * (1 + cos(pi * min(s, C) / C)) + mu
  sched = mn + s * (1 - mn),  mn = adam_min_alpha / adam_alpha
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_f = np.float32
_PI = _f(3.14159265359)


@dataclass(frozen=True)
class OptimConfig:
    adam_iter: int = 256
    alpha: float = 1e-3
    min_alpha: float = 0.0
    decay: float = 0.1
    decay_min_ndim: int = 2
    beta1: float = 0.9
    beta2: float = 0.999
    gclip: float = 1.0
    eps: float = 1e-8
    eps_f: float = 0.0
    warmup: int = 100
    cos_decay_steps: int = 1000
    cos_decay_restart: float = 1.1
    cos_decay_min: float = 0.1
    enable_restart: bool = False
    opt_past: int = 0
    opt_delta: float = 1e-5
    opt_max_no_improvement: int = 0
    grad_acc: int = 1


def cosine_decay(step: int, decay_steps: int, minimum: float) -> np.float32:
    step = min(step, decay_steps)
    cos_part = _f(0.5) * (_f(1.0) + np.cos((_PI * _f(step)) / _f(decay_steps), dtype=_f))
    return (_f(1.0) - _f(minimum)) * cos_part + _f(minimum)


def cosine_decay_restart(step: int, decay_steps: int, minimum: float, restart_mult: float) -> np.float32:
    while step > decay_steps:
        step -= decay_steps
        decay_steps = int(_f(restart_mult) * _f(decay_steps))
    return cosine_decay(step, decay_steps, minimum)


def learning_schedule(step: int, cfg: OptimConfig) -> float:
    """The `sched` factor llama.cpp computes in its callback for `step` (= opt.iter)."""
    if step < cfg.warmup:
        s = _f(step) / _f(cfg.warmup)
    elif cfg.enable_restart:
        s = cosine_decay_restart(step - cfg.warmup, cfg.cos_decay_steps, cfg.cos_decay_min, cfg.cos_decay_restart)
    else:
        s = cosine_decay(step, cfg.cos_decay_steps, cfg.cos_decay_min)
    mn = _f(cfg.min_alpha) / _f(cfg.alpha) if cfg.alpha else _f(0.0)
    return float(mn + _f(s) * (_f(1.0) - mn))
