"""Evaluation protocols for pretrained backbones (MAE Sec 4): kNN, linear probe, end-to-end fine-tuning."""

from maskkit.eval.run import evaluate, evaluate_backbones, load_backbone

__all__ = ["evaluate", "evaluate_backbones", "load_backbone"]
