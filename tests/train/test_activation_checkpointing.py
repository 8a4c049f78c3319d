"""train.activation_checkpointing: the same gradients from fewer saved activations."""

import torch
from torch.autograd.graph import saved_tensors_hooks

from maskkit.config import config_from_dict
from maskkit.methods import build_method
from maskkit.train import distributed
from tests.conftest import tiny_config_dict


def gradients_and_saved_bytes(cfg, checkpointed: bool) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    method = build_method(cfg).train()
    if checkpointed:
        distributed.checkpoint_activations(method)
    batch = {"images": torch.randn(4, 3, 16, 16), "keys": torch.arange(4, dtype=torch.long)}
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = method(batch).loss
    loss.backward()
    return {name: p.grad for name, p in method.named_parameters() if p.grad is not None}, sum(saved)


def test_checkpointed_blocks_give_the_same_gradients_and_keep_less():
    cfg = config_from_dict(tiny_config_dict(model={"encoder": {"depth": 4}}))
    plain, kept_plain = gradients_and_saved_bytes(cfg, checkpointed=False)
    recomputed, kept_checkpointed = gradients_and_saved_bytes(cfg, checkpointed=True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name      # the backward recomputes the same forward
    # The pack hook sees what autograd keeps until the backward: each block keeps only its input instead of
    # its attention and MLP activations (the recomputation's own saved tensors live only inside the backward).
    assert kept_checkpointed < 0.5 * kept_plain, (kept_checkpointed, kept_plain)
