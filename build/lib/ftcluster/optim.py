"""Optimizer and learning-rate schedule shared by every backend."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ftcluster.config import OptimConfig


def param_groups(module: nn.Module, *, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (norms, biases)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, *, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters, on CPU and GPU). The fused kernel also honours
    `optimizer.found_inf`, which is how a non-finite step is skipped without a host sync."""
    groups = param_groups(module, weight_decay=cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters (check peft.target_modules)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def lr_at(step: int, *, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up to cfg.lr over
    warmup_steps, then cosine decay to cfg.lr * min_lr_ratio at max_steps. A pure function of the
    step, so resuming needs no scheduler object state beyond the step."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
