import torch

from maskkit.nn.masking import gather_tokens, num_kept, random_masking


def test_fixed_count_per_sample_and_mask_matches_keep():
    noise = torch.rand(5, 64)
    m = random_masking(noise, 0.75)
    assert m.keep.shape == (5, 16)
    assert torch.all(m.mask.sum(1) == 48)                                   # 1 = removed
    for b in range(5):
        visible = set(torch.nonzero(m.mask[b] == 0).flatten().tolist())
        assert visible == set(m.keep[b].tolist())
        # The kept tokens are exactly those with the smallest noise.
        assert visible == set(torch.topk(noise[b], 16, largest=False).indices.tolist())


def test_restore_undoes_the_shuffle():
    noise = torch.rand(3, 10)
    m = random_masking(noise, 0.5)
    shuffle = torch.argsort(noise, dim=1)
    tokens = torch.arange(10.0).expand(3, 10).unsqueeze(-1)
    shuffled = gather_tokens(tokens, shuffle)
    assert torch.equal(gather_tokens(shuffled, m.restore), tokens)


def test_zero_ratio_keeps_everything():
    m = random_masking(torch.rand(2, 16), 0.0)
    assert m.keep.shape == (2, 16) and m.mask.sum() == 0
    assert num_kept(196, 0.75) == 49
