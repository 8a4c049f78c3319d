"""LQAE: Language Quantized AutoEncoders (Liu, Yan, Abbeel 2023). Section numbers refer to the paper.

A VQ autoencoder whose codebook is the frozen token-embedding table of a pretrained language model (Sec 3.1), so
that every image becomes a sequence of real words:

    encoder      z = ViT(image) -> one vector per patch, at the LM's width (a linear map when `project`)
    quantizer    id_i = argmax_k cos(z_i - mean_i(z), E_k - mean(E)) over the table's word rows (Sec 3.1: nearest
                 neighbour on l2-normalised vectors; special and [unused*] rows are never chosen), q_i = E[id_i]
    straight-through   the LM reads z + sg(q - z), which is q in value, and the encoder gets the gradient
                 (van den Oord et al. 2017); commitment beta * ||z - sg(q)||^2, beta = 0.005 (the authors' script)
    language model     frozen (Method.freeze), reading q through its own embedding stage (positions, LayerNorm:
                 `inputs_embeds`), with about half of the tokens replaced by its [MASK] row in training (Sec 3.1,
                 the script's bert_min_ratio = bert_max_ratio = 0.5), none at evaluation
    decoder      a small Transformer from the LM's last hidden state to the pixels (Sec 3.1; the authors' script
                 reads the last hidden state, use_bert_ste=False); loss: pixel MSE (+ an optional MLM loss on the
                 masked tokens, the script's bert_mask_loss_weight, where the LM has an MLM head)

Where maskkit departs from the authors' code (forhaoliu/language-quantized-autoencoders): the search centres the
encoder's vectors (each image's mean over its tokens) and the table (its mean word row) before the cosine: a random
encoder's tokens share most of their direction, so without it nearly every token of every image lands on the same
few codes (tests/methods/test_lqae.py measures it), and the table's rows share a mean direction too. And the
straight-through estimator and the commitment act on that centred direction scaled to the chosen code's norm
(`sphere`, the l2-normalised codes of ViT-VQGAN, Yu et al. 2022, Sec 3.2, which the search already uses): with the
raw encoder output, as the code has it, nothing bounds its norm (the search reads only its direction and the LM reads
the code), and on CPU-scale runs it grew until |z - q|^2 was 25-45 per element, the codes froze and collapsed (109
distinct codes over the 8,640 test tokens, encoder features below their random init; README, LQAE). The code
searches every row of RoBERTa's table; maskkit leaves out the rows that are not words ([PAD], [CLS], [SEP], [MASK],
[UNK], [unused*]), so that the sequence reads as text. No [CLS] / [SEP] are added around the image tokens (as the
code: the LM reads the patch tokens alone).

The two baselines of the fidelity benchmark are settings of the same module: `codebook: random` (a frozen random
table of the LM's shape and row norms, the same LM reading it) and `codebook: learned` with `decoder_input:
quantized` (a plain VQ-AE: a learned codebook, VQ-VAE's codebook loss, the LM out of the training path).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskkit.data.tokenizer import Tokenizer
from maskkit.errors import MaskkitError, require, require_float, require_int
from maskkit.files import image_grid
from maskkit.methods.base import Method, MethodOutput
from maskkit.methods.mae import patchify, unpatchify
from maskkit.nn.pos_embed import sincos_2d
from maskkit.nn.transformer import Block, TextTransformer, ViT, ViTConfig, check_mlp_ratio, check_width
from maskkit.rng import Stream, uniform

log = logging.getLogger("maskkit")
CODEBOOKS = ("lm", "random", "learned")
DECODER_INPUTS = ("lm", "quantized")
USAGE_WINDOW = 100        # steps: a code unused for this long counts as dead


def default_encoder() -> ViTConfig:
    return ViTConfig(image_size=32, patch_size=8, dim=128, depth=4, num_heads=4, cls_token=False)


@dataclass
class LQAEConfig:
    encoder: ViTConfig = field(default_factory=default_encoder)
    # The frozen language model: minilm (the bundled all-MiniLM-L6-v2) or a Hugging Face BERT directory
    # (BertModel or BertForMaskedLM, with its tokenizer files).
    lm: str = "minilm"
    project: bool = True              # a linear map from model.encoder.dim to the LM's width (needed when they differ)
    codebook: str = "lm"              # lm (LQAE) | random (a frozen random table like the LM's) | learned (VQ-AE)
    codebook_size: int = 1024         # rows of the learned codebook (codebook: learned)
    decoder_input: str = "lm"         # lm (the LM's last hidden state, LQAE) | quantized (the code vectors, VQ-AE)
    center: bool = True               # centre the encoder's vectors and the table before the search (see above)
    sphere: bool = True               # straight-through and commitment on the sphere of the code's norm (see above)
    commitment: float = 0.005         # beta of the commitment loss (the authors' script)
    lm_mask_ratio: float = 0.5        # tokens replaced by [MASK] before the LM in training
    mlm_weight: float = 0.0           # the MLM loss on the masked tokens (needs an LM with an MLM head); script: 1e-4
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    decoder_mlp_ratio: float = 4.0

    def frozen_parts(self) -> dict[str, str]:
        """{argument: source} of the pretrained parts the method is built with (maskkit.interop.pretrained)."""
        return {"lm": self.lm}

    def check(self, data, source: str) -> None:
        enc = self.encoder
        enc.check(source, "model.encoder")
        require(getattr(data, "kind", "image") == "image", source, "data.kind", getattr(data, "kind", None),
                "image for method lqae")
        require(enc.image_size == data.image_size, source, "model.encoder.image_size", enc.image_size,
                f"equal to data.image_size={data.image_size}")
        require(enc.in_channels == data.in_channels, source, "model.encoder.in_channels", enc.in_channels,
                f"equal to data.in_channels={data.in_channels}")
        require(bool(self.lm), source, "model.lm", self.lm, "minilm or a Hugging Face BERT directory")
        require(self.codebook in CODEBOOKS, source, "model.codebook", self.codebook, "one of " + ", ".join(CODEBOOKS))
        require(self.decoder_input in DECODER_INPUTS, source, "model.decoder_input", self.decoder_input,
                "lm or quantized")
        require_int(source, "model.codebook_size", self.codebook_size, 2)
        require_float(source, "model.commitment", self.commitment, 0.0)
        require_float(source, "model.lm_mask_ratio", self.lm_mask_ratio, 0.0, 1.0, high_open=True)
        require_float(source, "model.mlm_weight", self.mlm_weight, 0.0)
        require(not (self.mlm_weight and self.decoder_input != "lm"), source, "model.mlm_weight", self.mlm_weight,
                "0 with model.decoder_input=quantized (the LM is not in the training path)")
        require_int(source, "model.decoder_num_heads", self.decoder_num_heads, 1)
        check_width(source, "model.decoder_dim", self.decoder_dim, self.decoder_num_heads, "model.decoder_num_heads")
        require_int(source, "model.decoder_depth", self.decoder_depth, 0)
        check_mlp_ratio(source, "model.decoder_mlp_ratio", self.decoder_mlp_ratio, self.decoder_dim)


def word_rows(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the table rows the quantizer may choose, every token but the special ones ([PAD], [UNK], [CLS],
    [SEP], [MASK]) and the bracketed placeholders ([unused0] ...)."""
    special = tokenizer.special_ids()
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    for token, index in tokenizer.backend.get_vocab().items():
        if index < vocab_size and len(token) > 2 and token.startswith("[") and token.endswith("]"):
            allowed[index] = False
    allowed[[special.pad, special.unk, special.cls, special.sep, special.mask]] = False
    return allowed


def nearest_codes(vectors: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor, center: bool) -> torch.Tensor:
    """(B, N, D) vectors, (K, D) table -> (B, N) ids of the allowed row of highest cosine similarity (Sec 3.1), each
    image's vectors and the allowed rows centred first when `center`."""
    rows = allowed.nonzero().flatten()                                        # (K_allowed,)
    candidates = table[rows].float()
    vectors = vectors.float()
    if center:
        vectors = vectors - vectors.mean(dim=1, keepdim=True)
        candidates = candidates - candidates.mean(dim=0)
    similarity = F.normalize(vectors, dim=-1) @ F.normalize(candidates, dim=-1).T       # (B, N, K_allowed)
    return rows[similarity.argmax(dim=-1)]


def code_perplexity(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(entropy) of the codes' empirical distribution: k for a uniform use of k codes."""
    counts = torch.bincount(ids.flatten(), minlength=num_codes).float()
    probabilities = counts[counts > 0] / counts.sum()
    return torch.exp(-(probabilities * probabilities.log()).sum())


class LQAE(Method):
    name = "lqae"

    def __init__(self, cfg: LQAEConfig, lm: nn.Module | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        if lm is None or tokenizer is None:
            raise MaskkitError("LQAE is built with its frozen language model: maskkit.interop.pretrained.build_with_frozen_parts(cfg) "
                               "loads model.lm (minilm or a Hugging Face BERT directory)")
        self.cfg = cfg
        self.lm = lm
        self.freeze(self.lm)
        language = self.language_model
        width, vocab_size = language.cfg.dim, language.cfg.vocab_size
        self.tokenizer = tokenizer
        special = tokenizer.special_ids()          # fails in one line for a vocabulary without [MASK]
        if tokenizer.vocab_size > vocab_size:
            raise MaskkitError(f"model.lm: its tokenizer has {tokenizer.vocab_size} tokens, its table {vocab_size} rows")
        self.mask_id = special.mask
        enc = cfg.encoder
        self.encoder = ViT(enc)
        num_tokens = self.encoder.num_patches
        if num_tokens > language.cfg.context_length:
            raise MaskkitError(f"model.encoder: {enc.image_size}x{enc.image_size} images in {enc.patch_size}-pixel "
                               f"patches are {num_tokens} tokens, more than the LM's {language.cfg.context_length} "
                               "positions; use a larger model.encoder.patch_size or smaller images")
        if enc.dim != width and not cfg.project:
            raise MaskkitError(f"model.encoder.dim={enc.dim} does not match the LM's width {width}: set "
                               f"model.encoder.dim={width} or model.project=true (a linear map)")
        self.projection = nn.Linear(enc.dim, width) if cfg.project else nn.Identity()
        real_rows = language.token_embedding.weight.detach()[word_rows(tokenizer, vocab_size)]
        self.code_norm = float(real_rows.norm(dim=-1).mean())
        if cfg.codebook == "learned":
            self.codebook = nn.Parameter(F.normalize(torch.randn(cfg.codebook_size, width), dim=-1) * self.code_norm)
            self.register_buffer("allowed", torch.ones(cfg.codebook_size, dtype=torch.bool), persistent=False)
        else:
            self.codebook = None
            self.register_buffer("allowed", word_rows(tokenizer, vocab_size), persistent=False)
        if cfg.codebook == "random":
            # Fixed by a seed of its own, so that a resumed or evaluated run rebuilds the same table.
            generator = torch.Generator().manual_seed(0)
            real = language.token_embedding.weight.detach()
            random_rows = F.normalize(torch.randn(real.shape, generator=generator), dim=-1) * real.norm(dim=-1, keepdim=True)
            self.register_buffer("random_table", random_rows.to(real.dtype), persistent=False)
        else:
            self.random_table = None
        self.decoder_embed = nn.Linear(width, cfg.decoder_dim)
        grid = self.encoder.grid_size
        self.register_buffer("decoder_pos_embed", sincos_2d(cfg.decoder_dim, grid, grid).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, True,
                                                  enc.norm_eps) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=enc.norm_eps)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, enc.patch_size ** 2 * enc.in_channels)
        if cfg.mlm_weight and getattr(self.lm, "head", None) is None:
            raise MaskkitError(f"model.mlm_weight={cfg.mlm_weight}: the LM {cfg.lm} has no MLM head (a BertModel such "
                               "as all-MiniLM-L6-v2); give a BertForMaskedLM directory or set model.mlm_weight=0")
        # Which step last used each code (the dead-code fraction) and a decaying count of each code's uses (the
        # most used words): this rank's view of its training batches, not in the checkpoint.
        self._last_used = torch.full((len(self.allowed),), -1, dtype=torch.long)
        self._uses = torch.zeros(len(self.allowed))
        self._step = 0

    @property
    def language_model(self) -> TextTransformer:
        """The LM's encoder (an MLM part brings its head besides)."""
        return getattr(self.lm, "encoder", self.lm)

    @property
    def backbone(self) -> ViT:
        return self.encoder

    @property
    def table(self) -> torch.Tensor:
        """(K, D) the code vectors: the LM's token embeddings, the random table, or the learned codebook."""
        if self.codebook is not None:        # rows on the sphere of the LM's mean word-row norm with `sphere`
            return F.normalize(self.codebook, dim=-1) * self.code_norm if self.cfg.sphere else self.codebook
        if self.random_table is not None:
            return self.random_table
        return self.language_model.token_embedding.weight

    # Sec 3.1, step by step.

    def encode_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D_lm): the encoder's patch tokens at the LM's width."""
        tokens = self.encoder.patch_tokens(self.encoder(images))              # (B, N, D_enc)
        return self.projection(tokens)

    def quantize(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, N), code vectors E[ids] (B, N, D)) of the nearest allowed rows."""
        ids = nearest_codes(vectors.detach(), self.table.detach(), self.allowed, self.cfg.center)
        return ids, F.embedding(ids, self.table)

    def on_sphere(self, vectors: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """The direction the search compares (each image's vectors centred with `center`), at the chosen code's
        norm: the straight-through gradient then has no radial part, and the commitment pulls directions."""
        if self.cfg.center:
            vectors = vectors - vectors.mean(dim=1, keepdim=True)
        return F.normalize(vectors, dim=-1) * radius

    def read_with_lm(self, codes: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) code vectors -> the LM's last hidden state (B, N, D), tokens where `masked` is True replaced
        by the table's [MASK] row."""
        if masked is not None:
            mask_row = self.table[self.mask_id] if self.codebook is None else self.table.new_zeros(codes.shape[-1])
            codes = torch.where(masked[..., None], mask_row.to(codes.dtype), codes)
        placeholder = torch.zeros(codes.shape[:2], dtype=torch.long, device=codes.device)
        return self.language_model(placeholder, inputs_embeds=codes)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D_lm) -> (B, N, P*P*C) pixels of each patch."""
        x = self.decoder_embed(x) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def lm_mask(self, batch: dict, num_tokens: int, device) -> torch.Tensor:
        """(B, N) bool, round(ratio * N) tokens of each image chosen by its own key (Stream.TEXT_MASK)."""
        count = round(self.cfg.lm_mask_ratio * num_tokens)
        if "seed" in batch:
            noise = uniform(batch["seed"].to(device), (num_tokens,), Stream.TEXT_MASK)
        else:
            noise = torch.rand(len(batch["images"]), num_tokens, device=device)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return ranks < count

    def forward(self, batch: dict[str, torch.Tensor]) -> MethodOutput:
        images = batch["images"]                                                 # (B, C, H, W)
        vectors = self.encode_vectors(images)                                    # (B, N, D)
        ids, codes = self.quantize(vectors)                                      # (B, N), (B, N, D)
        if self.cfg.sphere:
            vectors = self.on_sphere(vectors, codes.detach().norm(dim=-1, keepdim=True))
        straight_through = vectors + (codes - vectors).detach()
        commitment = F.mse_loss(vectors.float(), codes.detach().float())
        loss = self.cfg.commitment * commitment
        logs = {}
        if self.codebook is not None:                                            # VQ-VAE's codebook loss
            codebook_loss = F.mse_loss(codes.float(), vectors.detach().float())
            loss = loss + codebook_loss
            logs["codebook_loss"] = codebook_loss.detach()
        masked = None
        if self.cfg.decoder_input == "lm":
            masked = self.lm_mask(batch, ids.shape[1], ids.device) if self.training else None
            hidden = self.read_with_lm(straight_through, masked)
        else:
            hidden = straight_through
        pred = self.decode(hidden)                                               # (B, N, P*P*C)
        reconstruction = F.mse_loss(pred.float(), patchify(images, self.encoder.cfg.patch_size).float())
        loss = loss + reconstruction
        if self.cfg.mlm_weight and masked is not None and bool(masked.any()):
            logits = self.lm.head(hidden[masked])                                # (M, V)
            mlm = F.cross_entropy(logits.float(), ids[masked])
            loss = loss + self.cfg.mlm_weight * mlm
            logs["mlm_loss"] = mlm.detach()
        if self.training:
            self._last_used = self._last_used.to(ids.device)
            self._last_used[ids.flatten()] = self._step
            self._uses = 0.99 * self._uses.to(ids.device) + torch.bincount(ids.flatten(), minlength=len(self._uses))
        logs.update(loss=loss.detach(), reconstruction=reconstruction.detach(), commitment=commitment.detach(),
                    **self.usage(ids))
        return MethodOutput(loss=loss, logs=logs, extras={"ids": ids, "pred": pred})

    # Code usage (logged from step 0) and what the codes say.

    def usage(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """unique codes and perplexity of the batch; dead codes: the fraction of the allowed codes unused in this
        rank's last USAGE_WINDOW training steps."""
        allowed = self.allowed.to(ids.device)
        last_used = self._last_used.to(ids.device)
        dead = ((last_used < 0) | (last_used < self._step - USAGE_WINDOW)) & allowed
        return {"unique_codes": torch.tensor(float(ids.unique().numel())),
                "perplexity": code_perplexity(ids, len(allowed)).detach().cpu(),
                "dead_codes": (dead.sum() / allowed.sum()).float().cpu()}

    def after_step(self, step: int, total_steps: int) -> None:
        self._step = step + 1
        if step % 100 == 0 or step + 1 == total_steps:
            log.info("lqae step %d: most used codes %s", step, ", ".join(self.most_used(8)))

    def most_used(self, count: int) -> list[str]:
        """The most used codes of the recent training steps (uses decayed by 0.99 a step), as words."""
        used = int((self._uses > 0).sum())
        return self.to_tokens(self._uses.topk(min(count, used)).indices.cpu()) if used else []

    def to_tokens(self, ids: torch.Tensor) -> list[str]:
        """Each id as its word piece (a learned codebook's codes are c0, c1, ...)."""
        if self.codebook is not None:
            return [f"c{i}" for i in ids.tolist()]
        return [self.tokenizer.backend.id_to_token(i) for i in ids.tolist()]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N) token ids (rows of the LM's table for codebook: lm)."""
        return self.quantize(self.encode_vectors(images))[0]

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N) ids -> (B, C, H, W) images, through the LM (no masking) when the decoder reads it."""
        codes = F.embedding(ids, self.table)
        hidden = self.read_with_lm(codes) if self.cfg.decoder_input == "lm" else codes
        pred = self.decode(hidden)
        return unpatchify(pred, self.encoder.cfg.patch_size, self.encoder.cfg.in_channels)

    def to_text(self, ids: torch.Tensor) -> list[str]:
        """(B, N) ids -> one line per image: its word pieces, row by row of the patch grid."""
        return [" ".join(self.to_tokens(row)) for row in ids]

    @torch.no_grad()
    def lm_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D): the frozen LM's last hidden state on the image's code vectors (no masking), averaged over the
        tokens: the features the LM-side evaluation protocols read."""
        codes = self.quantize(self.encode_vectors(images))[1]
        return self.read_with_lm(codes).mean(dim=1)

    def save_figures(self, batch, out_dir: Path, denormalize=lambda x: x) -> list[Path]:
        """Eight images of the last batch above their reconstructions from their codes."""
        images = batch["images"][:8]
        was_training = self.training
        self.eval()
        ids = self.encode(images)
        reconstruction = self.decode_ids(ids)
        self.train(was_training)
        rows = {"original": denormalize(images.float()), "from its words": denormalize(reconstruction.float())}
        return [image_grid(rows, f"LQAE reconstructions ({ids.shape[1]} words per image)",
                           Path(out_dir) / "reconstruction.png")]
