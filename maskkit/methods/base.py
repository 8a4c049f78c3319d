"""What every method returns, and the few hooks the training loop calls explicitly.

A method is an `nn.Module` whose `forward(batch)` takes a dict of tensors and returns a MethodOutput.
Everything else the loop needs is an ordinary method call, documented in README "Writing a method".
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class MethodOutput:
    loss: torch.Tensor                                    # scalar the loop backpropagates
    logs: dict[str, torch.Tensor] = field(default_factory=dict)    # detached scalars for the progress bar / metrics
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # anything else (predictions, masks)


class Method(nn.Module):
    """Base class: defaults for the hooks; subclasses set `name`, `backbone` and implement forward."""

    name: str = "method"
    # State-dict prefixes that are neither optimized nor saved (a frozen teacher, a frozen language model).
    frozen_prefixes: tuple[str, ...] = ()

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:
        """The network exported for downstream use (fine-tuning, probing)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (momentum encoders, queues). Default: nothing."""

    def save_figures(self, batch: dict[str, torch.Tensor], out_dir: Path, denormalize=lambda x: x) -> list[Path]:
        """Called once at the end of training with a batch; returns the figures written.

        `denormalize` maps the batch's normalised images back to [0, 1] pixels for display.
        """
        return []

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: parameters and persistent buffers, frozen parts left out."""
        return {
            key: value
            for key, value in self.state_dict().items()
            if not any(key.startswith(prefix) for prefix in self.frozen_prefixes)
        }
