"""What a training method is: a module holding a :class:`HashNet` plus whatever else it trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medret.models.backbones import create_backbone
from medret.models.hashnet import HashNet
from medret.registry import Registry


@dataclass(frozen=True)
class TaskInfo:
    """What the data says about the task. ``label`` is the combined (organ, class) id."""

    bits: int  # the whole code
    n_classes: int  # combined (organ, class) labels
    n_organs: int
    channels: int = 1
    input_size: tuple[int, int] = (28, 28)
    fine_bits: int = 0  # similarity bits, fitted after training; the losses train the rest
    mean: tuple[float, ...] | None = None  # input normalisation (a pretrained backbone's); default 0.5 / 0.25
    std: tuple[float, ...] | None = None

    @property
    def semantic_bits(self) -> int:
        return self.bits - self.fine_bits


#: The small-ResNet training recipe the classifier and momentum methods share (``hyper`` is their own).
SMALL_RESNET: dict[str, Any] = {
    "architecture": "resnet",
    "arch": {"widths": [16, 32, 64, 128], "blocks": 1},
    "lr": 2e-3,
    "weight_decay": 5e-4,
    "batch_size": 256,
    "epochs": 8,
}


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and ``defaults`` and implement ``forward``."""

    name: ClassVar[str] = ""
    # architecture, arch kwargs, optimisation, loss weights and code options a fresh run starts from
    defaults: ClassVar[dict[str, Any]] = {}
    classifier_classes: ClassVar[str] = "label"  # the HashNet classifier head predicts: label | organ | none

    def __init__(self, task: TaskInfo, architecture: str, arch: dict[str, Any], hyper: dict[str, Any]) -> None:
        super().__init__()
        self.task = task
        self.hyper = {**self.defaults.get("hyper", {}), **hyper}
        unknown = set(hyper) - set(self.defaults.get("hyper", {}))
        if unknown:
            known = ", ".join(sorted(self.defaults.get("hyper", {}))) or "(none)"
            raise ValueError(f"method {self.name!r} has no hyperparameter(s) {sorted(unknown)}; known: {known}")
        n_head = {"label": task.n_classes, "organ": 0, "none": 0}[self.classifier_classes]
        self.encoder = HashNet(
            create_backbone(architecture, task.channels, arch),
            task.bits,
            n_classes=n_head,
            fine_bits=task.fine_bits,
            mean=task.mean or (0.5,) * task.channels,
            std=task.std or (0.25,) * task.channels,
        )

    def forward(
        self, x: torch.Tensor, organ: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def after_step(self) -> None:
        """Called after every optimiser step (momentum updates, queues)."""


METHODS: Registry[Method] = Registry("training method")


def quantization_loss(code: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of tanh codes from {-1, +1}: ``mean((|h| - 1)^2)``.

    >>> float(quantization_loss(torch.tensor([[1.0, -1.0]])))
    0.0
    >>> float(quantization_loss(torch.tensor([[0.0, 0.5]])))
    0.625
    """
    return (code.abs() - 1).pow(2).mean()


def same(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise equality matrix of two label vectors (b defaults to a)."""
    b = a if b is None else b
    return a[:, None] == b[None, :]
