"""LQAE (Liu et al. 2023): the quantizer against a brute-force search, the straight-through estimator, the frozen LM
(no gradients, eval mode, bit-identical, outside the optimizer and the checkpoint), the word rows, exact resume,
two ranks == one, the evaluation protocols, and bad input in one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from maskkit.cli import main
from maskkit.config import config_from_dict
from maskkit.data.tokenizer import Tokenizer, minilm_tokenizer_file
from maskkit.errors import MaskkitError
from maskkit.eval.lqae import few_shot_accuracy
from maskkit.interop.hf_bert import minilm_dir
from maskkit.interop.pretrained import build_with_frozen_parts
from maskkit.methods.lqae import code_perplexity, nearest_codes, word_rows
from maskkit.train.checkpoint import find_checkpoint
from maskkit.train.loop import train
from tests.conftest import deep_update
from tests.helpers import (
    SUMMATION_ORDER,
    assert_bitwise_equal,
    assert_close_at_scale,
    assert_same_weights,
    resumed_and_straight,
    train_on_two_ranks,
)

transformers = pytest.importorskip("transformers")


def save_small_bert(directory, masked_lm: bool = False, positions: int = 64):
    """A random 2-layer BERT of width 32 with MiniLM's vocabulary and tokenizer: an LM that builds in milliseconds."""
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=positions)
    torch.manual_seed(0)
    model = (transformers.BertForMaskedLM if masked_lm else transformers.BertModel)(config)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_dir() / name).is_file():
            shutil.copy(minilm_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    return save_small_bert(tmp_path_factory.mktemp("lm") / "bert")


def lqae_dict(lm, **sections) -> dict:
    values = {
        "name": "lqae-test", "method": "lqae",
        "model": {"encoder": {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "num_heads": 2,
                              "cls_token": False},
                  "lm": str(lm), "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
        "data": {"name": "digits", "image_size": 16},
        "optim": {"base_lr": 1e-2, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 3, "threads": 1},
        "eval": {"pool": "mean", "probe_epochs": 5, "batch_size": 64},
    }
    return deep_update(values, sections)


def test_the_word_rows_leave_out_the_special_and_unused_tokens():
    tokenizer = Tokenizer.from_file(minilm_tokenizer_file(), 512)
    allowed = word_rows(tokenizer, 30522)
    vocabulary = tokenizer.backend.get_vocab()
    assert int(allowed.sum()) == 30522 - 994 - 5                  # 994 [unused*] rows and [PAD] [UNK] [CLS] [SEP] [MASK]
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused993]"):
        assert not allowed[vocabulary[token]], token
    for token in ("the", "##ing", "[", "]", "paris"):
        assert allowed[vocabulary[token]], token


def test_the_search_is_a_brute_force_cosine_argmax_over_allowed_rows():
    generator = torch.Generator().manual_seed(0)
    vectors, table = torch.randn(3, 5, 8, generator=generator), torch.randn(40, 8, generator=generator)
    allowed = torch.rand(40, generator=generator) > 0.3
    for center in (False, True):
        ids = nearest_codes(vectors, table, allowed, center)
        v = vectors - vectors.mean(1, keepdim=True) if center else vectors
        t = table - table[allowed].mean(0) if center else table
        for b in range(3):
            for n in range(5):
                scores = [float(torch.cosine_similarity(v[b, n], t[k], dim=0)) if allowed[k] else -2.0
                          for k in range(40)]
                assert ids[b, n] == max(range(40), key=scores.__getitem__)
        assert allowed[ids].all()


def test_centering_spreads_a_random_encoders_tokens_over_the_vocabulary():
    """The measurement behind model.center: with the real MiniLM table, a random encoder's tokens of 64 digits
    fall on a few codes without centering (each image's tokens share most of their direction)."""
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    unique = {}
    for center in (False, True):
        torch.manual_seed(0)
        cfg = config_from_dict({"method": "lqae", "model": {"center": center}, "data": {"image_size": 32}})
        method = build_with_frozen_parts(cfg).eval()
        ids = method.encode(images)
        assert ids.shape == (64, 16) and method.allowed[ids].all() and int(ids.max()) < 30522
        unique[center] = ids.unique().numel()
    assert unique[True] > 3 * unique[False], unique


def test_inputs_embeds_of_the_table_rows_give_what_the_ids_give():
    from maskkit.interop.hf_bert import load_hf_bert

    lm = load_hf_bert(minilm_dir())
    ids = torch.randint(1000, 30000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(lm(ids, inputs_embeds=lm.token_embedding.weight[ids]), lm(ids))


def test_straight_through_the_lm_reads_the_codes_and_the_encoder_gets_the_gradient(small_lm):
    method = build_with_frozen_parts(config_from_dict(lqae_dict(small_lm))).train()
    images = torch.randn(4, 3, 16, 16)
    seen = []
    method.language_model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = method({"images": images, "seed": torch.arange(4)})
    ids = out.extras["ids"]
    lm = method.language_model
    masked = method.lm_mask({"images": images, "seed": torch.arange(4)}, 16, images.device)
    assert masked.sum(1).tolist() == [8, 8, 8, 8]                             # half of each image's tokens
    codes = torch.where(masked[..., None], lm.token_embedding.weight[method.mask_id], lm.token_embedding.weight[ids])
    with torch.no_grad():
        expected = lm.embed(ids, inputs_embeds=codes)
    # The LM read E[ids] (and [MASK]): z + (q - z) is q up to float rounding of z's scale.
    assert_close_at_scale(seen[0], expected, SUMMATION_ORDER)
    out.loss.backward()
    assert method.encoder.patch_embed.weight.grad.abs().sum() > 0            # through the straight-through estimator
    assert all(p.grad is None for p in method.lm.parameters())


def test_decode_ids_reads_exactly_the_rows_of_its_ids(small_lm):
    method = build_with_frozen_parts(config_from_dict(lqae_dict(small_lm))).eval()
    ids = torch.tensor([[2000 + i for i in range(16)]])
    before = method.decode_ids(ids)
    table = method.language_model.token_embedding.weight
    with torch.no_grad():
        table[5000] += 10.0                                                  # a row the ids do not use
        assert torch.equal(method.decode_ids(ids), before)
        table[2003] += 10.0                                                  # a row they use
        assert not torch.equal(method.decode_ids(ids), before)
    assert before.shape == (1, 3, 16, 16)


def test_perplexity_of_a_uniform_use_of_k_codes_is_k():
    assert float(code_perplexity(torch.arange(7).repeat(5), 100)) == pytest.approx(7.0)
    assert float(code_perplexity(torch.zeros(9, dtype=torch.long), 100)) == pytest.approx(1.0)


def test_the_lm_stays_frozen_outside_the_optimizer_and_the_checkpoint(small_lm, tmp_path, monkeypatch):
    from maskkit.train import loop

    cfg = config_from_dict(lqae_dict(small_lm, train={"steps": 3}))
    reference = build_with_frozen_parts(cfg).language_model.state_dict()
    built = []
    optimizer_builder = loop.build_optimizer

    def capture(method, *args):
        built.append(method)
        return optimizer_builder(method, *args)

    monkeypatch.setattr(loop, "build_optimizer", capture)
    train(cfg, tmp_path / "run", progress=False)
    method = built[0]
    optimized = {id(p) for group in loop.build_optimizer(method, cfg.optim, 1e-3).param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in method.lm.parameters())
    assert not method.lm.training and all(not p.requires_grad for p in method.lm.parameters())
    for name, value in method.language_model.state_dict().items():
        assert torch.equal(value, reference[name]), name                    # bit-identical after training
    saved = load_file(find_checkpoint(tmp_path / "run") / "model.safetensors")
    assert saved and not any(key.startswith("lm.") for key in saved)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"unique_codes", "perplexity", "dead_codes"} <= rows[0].keys() and rows[0]["step"] == 1


def test_resume_across_epochs_is_bitwise(small_lm, tmp_path):
    # 1,257 training digits / 16 a step: 79 steps an epoch; with train.steps 6 the resume crosses no epoch, so the
    # data set is cut to 40 images (2.5 steps an epoch) by a held-out split of 0.978.
    cfg = config_from_dict(lqae_dict(small_lm, data={"eval_split": 0.978}))
    straight, resumed = resumed_and_straight(cfg, tmp_path, stop_at=4)
    assert_bitwise_equal(straight, resumed)


@pytest.mark.slow
def test_two_ranks_train_lqae_like_one(small_lm, tmp_path):
    cfg_dict = lqae_dict(small_lm, train={"steps": 3, "checkpoint_every": 3})
    train_on_two_ranks(cfg_dict, tmp_path / "two", tmp_path / "init")
    train(config_from_dict(cfg_dict), tmp_path / "one", progress=False)
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_the_mlm_loss_reads_the_lms_own_head(tmp_path):
    lm = save_small_bert(tmp_path / "mlm", masked_lm=True)
    method = build_with_frozen_parts(config_from_dict(lqae_dict(lm, model={"mlm_weight": 0.1}))).train()
    out = method({"images": torch.randn(2, 3, 16, 16), "seed": torch.arange(2)})
    assert float(out.logs["mlm_loss"]) > 5.0                                 # ~log(30522) for a random head


def test_few_shot_episodes_are_perfect_on_separated_classes_and_chance_on_noise():
    labels = torch.arange(10).repeat_interleave(30)
    separated = torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.randn(300, 10)
    assert few_shot_accuracy(separated, labels, 5, 1, episodes=50) == 1.0
    noise = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert abs(few_shot_accuracy(noise, labels, 5, 5, episodes=200) - 0.2) < 0.05


def test_the_tokens_and_lm_features_protocols_run_on_a_run_and_its_random_init(small_lm, tmp_path, capsys):
    train(config_from_dict(lqae_dict(small_lm, train={"steps": 2})), tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--protocol", "tokens"]) == 0
    printed = capsys.readouterr().out
    assert "reconstruction PSNR (dB) from the words" in printed and (tmp_path / "run" / "tokens.png").stat().st_size > 5000
    recorded = json.loads((tmp_path / "run" / "eval.json").read_text())["tokens"][0]
    assert len(recorded["sequences"]) == 8 and len(recorded["sequences"][0].split(" ")) == 16
    assert main(["eval", str(tmp_path / "run"), "--protocol", "lm-features"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())["lm-features"][0]
    for key in ("pretrained", "random_init", "pretrained_knn", "pretrained_5way_1shot", "random_init_5way_5shot"):
        assert 0.0 <= result[key] <= 1.0, key


def test_bad_input_is_refused_in_one_line_before_training(small_lm, tmp_path):
    no_mask = tmp_path / "no-mask"
    shutil.copytree(small_lm, no_mask)
    tokenizer = json.loads((no_mask / "tokenizer.json").read_text(encoding="utf-8"))
    del tokenizer["model"]["vocab"]["[MASK]"]
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "[MASK]"]
    (no_mask / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    (tmp_path / "not-a-model").mkdir()
    cases = [
        ({"model": {"lm": str(tmp_path / "not-a-model")}}, "not a Hugging Face BERT directory"),
        ({"model": {"lm": str(no_mask)}}, "no [MASK] token"),
        ({"model": {"project": False}}, "model.encoder.dim=32 does not match the LM's width 32"),
        ({"model": {"encoder": {"image_size": 32, "patch_size": 2}}, "data": {"image_size": 32}},
         "256 tokens, more than the LM's 64 positions"),
        ({"model": {"mlm_weight": 0.1}}, "has no MLM head"),
    ]
    for sections, message in cases:
        if "does not match" in message:                  # the small LM is 32 wide: make the encoder 48
            sections = {"model": {"project": False, "encoder": {"dim": 48}}}
            message = "model.encoder.dim=48 does not match the LM's width 32"
        with pytest.raises(MaskkitError) as error:
            build_with_frozen_parts(config_from_dict(lqae_dict(small_lm, **sections)))
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("codebook", "words", "model.codebook"), ("decoder_input", "pixels", "model.decoder_input"),
    ("codebook_size", 1, "model.codebook_size"), ("commitment", -0.1, "model.commitment"),
    ("commitment", float("nan"), "model.commitment"), ("lm_mask_ratio", 1.0, "model.lm_mask_ratio"),
    ("mlm_weight", -1.0, "model.mlm_weight"), ("lm", "", "model.lm"), ("project", "yes", "model.project"),
    ("decoder_dim", 15, "model.decoder_dim"), ("decoder_depth", -1, "model.decoder_depth"),
])
def test_bad_values_of_the_lqae_keys_are_refused_naming_the_key(key, value, message):
    with pytest.raises(MaskkitError, match=message.replace(".", r"\.")):
        config_from_dict(lqae_dict("minilm", model={key: value}))


def test_on_the_sphere_the_straight_through_gradient_has_no_radial_part(small_lm):
    """model.sphere: the encoder's vectors enter as their centred directions at the codes' norms, so the gradient
    they get cannot grow them (the drift that froze and collapsed the codes with the raw vectors)."""
    method = build_with_frozen_parts(config_from_dict(lqae_dict(small_lm)))
    vectors = torch.randn(2, 16, 32, requires_grad=True)
    radius = torch.rand(2, 16, 1) + 0.5
    on_sphere = method.on_sphere(vectors, radius)
    centred = vectors.detach() - vectors.detach().mean(1, keepdim=True)
    torch.testing.assert_close(on_sphere.norm(dim=-1, keepdim=True), radius)
    (on_sphere * torch.randn(2, 16, 32)).sum().backward()
    # d/dt of the sum of the centred vectors' squared norms along the gradient: zero, image by image (each token's
    # own part is tangent; the mean's part sums to zero against centred vectors that sum to zero).
    radial = (vectors.grad * centred).sum(dim=(1, 2))
    assert radial.abs().max() < 1e-5 * (vectors.grad.norm() * centred.norm())
