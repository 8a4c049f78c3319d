"""Methods by name: the one place that maps a recipe's `method:` to its class and config."""

from maskkit.methods.base import Method, MethodOutput
from maskkit.methods.densecl import DenseCL, DenseCLConfig
from maskkit.methods.energy import Energy, EnergyConfig
from maskkit.methods.flip import FLIP, FLIPConfig
from maskkit.methods.lqae import LQAE, LQAEConfig
from maskkit.methods.mae import MAE, MAEConfig
from maskkit.methods.mlm import MLM, MLMConfig
from maskkit.methods.moco import MoCo, MoCoConfig
from maskkit.methods.pmlm import PMLM, PMLMConfig
from maskkit.methods.tinybert import TinyBERT, TinyBERTConfig
from maskkit.methods.xlnet import XLNet, XLNetConfig

METHODS: dict[str, tuple[type[Method], type]] = {
    "mae": (MAE, MAEConfig),
    "flip": (FLIP, FLIPConfig),
    "energy": (Energy, EnergyConfig),
    "moco": (MoCo, MoCoConfig),
    "densecl": (DenseCL, DenseCLConfig),
    "mlm": (MLM, MLMConfig),
    "xlnet": (XLNet, XLNetConfig),
    "pmlm": (PMLM, PMLMConfig),
    "tinybert": (TinyBERT, TinyBERTConfig),
    "lqae": (LQAE, LQAEConfig),
}


def build_method(cfg) -> Method:
    """The method a config names, built from its `model:` section (one with frozen pretrained parts, LQAE, is built
    by maskkit.interop.pretrained.build_with_frozen_parts, which loads them)."""
    method_cls, _ = METHODS[cfg.method]
    return method_cls(cfg.model)


__all__ = ["METHODS", "Method", "MethodOutput", "MAE", "MAEConfig", "FLIP", "FLIPConfig", "Energy", "EnergyConfig", "MoCo", "MoCoConfig", "DenseCL", "DenseCLConfig",
           "MLM", "MLMConfig", "XLNet", "XLNetConfig", "PMLM", "PMLMConfig", "TinyBERT", "TinyBERTConfig", "LQAE", "LQAEConfig",
           "build_method"]
