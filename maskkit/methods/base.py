"""What every method returns, and the few hooks the training loop calls explicitly.

A method is an `nn.Module` whose `forward(batch)` takes a dict of tensors and returns a MethodOutput.
Everything else the loop needs is an ordinary method call, documented in README "Writing a method".
"""

import dataclasses
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
    # Whether the method trains under bf16 autocast (train.precision=bf16); a method whose numerics need
    # fp32 (second-order gradients, say) sets this False and the config check refuses bf16 for it.
    supports_bf16: bool = True
    # Why train.compile is refused for the method ("" = it compiles): torch.compile cannot run everything.
    compile_refusal: str = ""
    # Why train.parallel=fsdp2 is refused ("" = it shards), and likewise train.activation_checkpointing.
    fsdp2_refusal: str = ""
    activation_checkpointing_refusal: str = ""

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:
        """The network exported for downstream use (fine-tuning, probing)."""
        raise NotImplementedError

    def exports(self) -> dict[str, tuple[nn.Module, dict]]:
        """{name: (module, its config as a dict)}: written to RUN/<name>.safetensors at the end of training.

        "backbone" is what evaluation loads; a two-tower method adds its other tower under another name.
        """
        config = getattr(self.backbone, "cfg", None)
        return {"backbone": (self.backbone, dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {})}

    def check_data(self, data) -> None:
        """Called once the training data is built (`maskkit.data.Data`): e.g. the tokenizer's vocabulary
        against the model's embedding table. Raise MaskkitError naming the key to change. Default: nothing."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step with the number of steps done before it (0-based) and the
        run's total (momentum and weight schedules need both). Default: nothing."""

    def save_figures(self, batch: dict[str, torch.Tensor], out_dir: Path, denormalize=lambda x: x) -> list[Path]:
        """Called once at the end of training with a batch; returns the figures written.

        `denormalize` maps the batch's normalised images back to [0, 1] pixels for display.
        """
        return []

    # Frozen parts (a distillation teacher, a frozen language model), in one place.

    def freeze(self, module: nn.Module) -> nn.Module:
        """Freeze a sub-module: no gradients, eval mode (dropout off) that `train()` does not undo, and left
        out of the optimizer and of checkpoints. Its weights must come from elsewhere (a pretrained file)
        when the method is built, so that a resumed run rebuilds it identically. Returns `module`."""
        if not any(child is module for child in self.modules()):
            raise ValueError("freeze() takes a sub-module already assigned to the method")
        module.requires_grad_(False)
        module.eval()
        frozen = self.__dict__.setdefault("_frozen_modules", [])
        if not any(m is module for m in frozen):
            frozen.append(module)
        return module

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen sub-modules ("teacher.")."""
        frozen = self.__dict__.get("_frozen_modules", [])
        return tuple(f"{name}." for name, module in self.named_modules() if any(module is m for m in frozen))

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.__dict__.get("_frozen_modules", []):
            module.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: parameters and persistent buffers, frozen parts left out."""
        prefixes = self.frozen_prefixes
        return {key: value for key, value in self.state_dict().items()
                if not any(key.startswith(prefix) for prefix in prefixes)}
