"""Exponential moving average of model weights, with the usual warm-up of the decay."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keep ``shadow`` = an exponential moving average of ``model``'s parameters.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so early weights, which
    are far from the final ones, are forgotten quickly. Buffers are copied, not averaged.
    ``state_dict``/``load_state_dict`` make it resumable (accelerate's ``register_for_checkpointing``).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimizer step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow = dict(self.shadow.named_parameters())
        params = [(shadow[name], p) for name, p in model.named_parameters()]
        torch._foreach_lerp_([s for s, _ in params], [p.detach().to(s.dtype) for s, p in params], 1 - decay)
        own_buffers = dict(self.shadow.named_buffers())
        for name, buffer in model.named_buffers():
            own_buffers[name].copy_(buffer)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.updates = state["updates"]
        self.shadow.load_state_dict(state["shadow"], strict=True)
