"""ViT encoder + classifier head, with an optional MAE decoder for the SSAT / FGCR auxiliary task.

One class, `SSATViT`; the registry entries below only set its dimensions. Parameter names are
facebookresearch/mae's (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N`, `norm`, `head`,
`mask_token`, `decoder_*`), so MAE checkpoints load without renaming and the encoder part loads
strictly into timm's `VisionTransformer(global_pool='token', fc_norm=False)` (or, with
`global_pool=True`, `VisionTransformer(global_pool='avg', fc_norm=True)`, MAE's fine-tuning head).

Position embeddings: the SSAT/FGCR models (`mae_vit_*`) use MAE's fixed 2-D sin-cos tables; the
scratch baseline (`vit_*`) learns its table by default, as timm's VisionTransformer (the published
baseline) does. `pos_embed='sincos'` or `'learned'` overrides either.

    model = create_model('mae_vit_tiny', num_classes=10, img_size=32, patch_size=4)
    logits = model.classify(images)                  # (B, C), the inference path
    out = model(images, mask_views=3)                # FGCR with 3 disjoint mask views
    out['logits'], out['rec'], out['fgc'], out['mask']

The model computes the loss parts; `ssat.objective` weighs them.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from ssat.masking import decoder_slots, masks_from_ids, num_visible, visible_ids
from ssat.pos_embed import sincos_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)

# name -> dimensions. A `decoder_*` entry makes an SSAT/FGCR model; without one it is the
# scratch baseline (encoder + head only).
_SIZES = {
    # sized for a CPU and small images (the embedded default trains it on 8x8 digit scans)
    "micro": dict(embed_dim=128, depth=3, num_heads=4, decoder=(64, 1, 4)),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder=(128, 2, 16)),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder=(128, 2, 16)),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder=(512, 8, 16)),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder=(512, 8, 16)),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder=(512, 8, 16)),
}
_REGISTRY: dict[str, dict] = {}
for _size, _dims in _SIZES.items():
    _enc = {k: v for k, v in _dims.items() if k != "decoder"}
    _dec = dict(
        zip(
            ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"),
            _dims["decoder"],
            strict=True,
        )
    )
    _REGISTRY[f"mae_vit_{_size}"] = {**_enc, **_dec}
    _REGISTRY[f"vit_{_size}"] = _enc


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    name: str, *, num_classes: int, img_size: int = 224, patch_size: int = 16, **overrides
) -> "SSATViT":
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    kwargs = {**_REGISTRY[name], **overrides}
    if kwargs.get("pos_embed") is None:  # the baseline learns its table, as timm's ViT does
        kwargs["pos_embed"] = "sincos" if "decoder_embed_dim" in kwargs else "learned"
    return SSATViT(num_classes=num_classes, img_size=img_size, patch_size=patch_size, **kwargs)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float) -> nn.ModuleList:
    # Stochastic depth rising linearly to `drop_path` over the blocks.
    rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=rate)
        for rate in rates
    )


class SSATViT(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int | None = None,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        global_pool: bool = False,
        pos_embed: str = "sincos",
        frozen_patch_embed: bool = False,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = img_size // patch_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_patches = grid * grid
        self.num_classes = num_classes
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.learned_pos_embed = pos_embed == "learned"
        self.global_pool = global_pool
        self.frozen_patch_embed = frozen_patch_embed
        self.has_decoder = decoder_embed_dim is not None

        # Encoder. The sin-cos table (cls slot included) is fixed, or the start of a learned one.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, grid)[None], requires_grad=self.learned_pos_embed
        )
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        # Global pooling (MAE's fine-tuning head) classifies the mean patch token through
        # `fc_norm`; the final `norm` then serves only the decoder, and a model without one has
        # none (MAE's fine-tuned checkpoints hold `fc_norm.*` and no `norm.*`).
        self.norm = LayerNorm(embed_dim) if self.has_decoder or not global_pool else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim) if global_pool else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # MAE decoder (absent in the scratch baseline).
        if self.has_decoder:
            self.mask_ratio = mask_ratio
            self.num_visible = num_visible(self.num_patches, mask_ratio)
            self.norm_pix_loss = norm_pix_loss
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(
                sincos_2d(decoder_embed_dim, grid)[None], requires_grad=False
            )
            self.decoder_blocks = _blocks(
                decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, 0.0
            )
            self.decoder_norm = LayerNorm(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.init_weights()

    # ----------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears and patch projection, zero biases,
        normal(0.02) tokens, unit LayerNorms."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.learned_pos_embed:  # timm's initialisation of a learned table
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.has_decoder:
            nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            self._init_module(module)
        if self.frozen_patch_embed:
            self.freeze_patch_embed()

    def freeze_patch_embed(self) -> None:
        """MoCo v3's random patch projection: uniform in +-sqrt(6 / (fan_in + fan_out)) over
        the (3 x p x p) -> D map, zero bias, and never trained (its gradients are not kept, so
        no optimizer group holds it)."""
        proj = self.patch_embed.proj
        fan_in = proj.weight[0].numel()  # in_chans x p x p
        bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        proj.weight.requires_grad_(False)
        proj.bias.requires_grad_(False)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def reset_head(self, num_classes: int) -> None:
        """A fresh classifier for another class count (fine-tuning)."""
        dim = self.cls_token.shape[-1]
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_module(self.head)
        self.head.to(self.cls_token.device)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for layer-wise learning-rate decay, by MAE's rule (timm's parameter grouping):
        patch embedding, cls token and position table first, block i next, everything else
        (norms, head, decoder) last. timm's own ViT matcher would put the final norm with the
        last block; MAE gives it the full rate."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)",
            "rest": r"^norm|^fc_norm|^head|^decoder_|^mask_token",
        }

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder + head weights: what timm's VisionTransformer (and a scratch model) load. With
        global pooling the final `norm` belongs to the decoder path and is left out too."""
        left_out = ("decoder_", "mask_token") + (("norm.",) if self.global_pool else ())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(left_out)}

    # -------------------------------------------------------------------------- encoder
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, D) patch tokens with their position embedding."""
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def blocks_out(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, n, D) position-embedded patch tokens -> (N, 1 + n, D) after the blocks, cls first,
        before the final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return x

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, n, D) position-embedded patch tokens -> (N, 1 + n, D), cls first, normed."""
        return self.norm(self.blocks_out(tokens))

    def head_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) position-embedded patch tokens of the unmasked image -> (B, num_classes):
        the normed cls token, or with global pooling the mean patch token through `fc_norm`."""
        x = self.blocks_out(tokens)
        if self.global_pool:
            return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))
        return self.head(self.norm(x)[:, 0])

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits of the unmasked image (the inference path)."""
        return self.head_logits(self.embed(images))

    # -------------------------------------------------------------------------- decoder
    def decode(
        self, latent: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1 + k, D) encoded visible tokens, (N, L) slots -> (N, L, p*p*C) pixels and the
        (N, Dd) decoder cls token."""
        x = self.decoder_embed(latent)  # (N, 1 + k, Dd)
        n, _, dim = x.shape
        # Visible tokens then one mask token; each patch position picks its slot, so every
        # visible token lands at its own position and all others get the mask token.
        pool = torch.cat([x[:, 1:], self.mask_token.expand(n, 1, dim)], dim=1)  # (N, k + 1, Dd)
        patches = pool.gather(1, slots.unsqueeze(-1).expand(-1, -1, dim))  # (N, L, Dd)
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:]), x[:, 0]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), MAE's patch layout (row-major patches, (p, q, c)
        inside)."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        b, n, _ = patches.shape
        p, c = self.patch_size, self.in_chans
        g = int(n**0.5)
        x = patches.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def reconstruction_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean over views of the per-patch pixel MSE over that view's masked patches.

        pred (r, B, L, P), mask (r, B, L) bool, True = masked."""
        target = self.patchify(images).float()  # (B, L, P)
        if self.norm_pix_loss:
            mean, std = _patch_stats(target)
            target = (target - mean) / std
        per_patch = (pred.float() - target.unsqueeze(0)).pow(2).mean(dim=-1)  # (r, B, L)
        weight = mask.to(per_patch.dtype)
        per_view = (per_patch * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))  # (r,)
        return per_view.mean()

    # -------------------------------------------------------------------------- forward
    def forward(
        self, images: torch.Tensor, mask_views: int = 1, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Classification of the unmasked image plus, with a decoder, the auxiliary losses.

        `noise` (B, L) fixes the patch shuffle (for tests); by default it is drawn uniformly."""
        tokens = self.embed(images)  # (B, L, D)
        logits = self.head_logits(tokens)
        if not self.has_decoder:
            return {"logits": logits}

        pred, dec_cls, mask = self._masked_views(tokens, mask_views, noise)
        rec = self.reconstruction_loss(images, pred, mask)
        if mask_views >= 2:
            fgc = consistency_loss(dec_cls)
        else:
            fgc = rec.new_zeros(())
        return {"logits": logits, "rec": rec, "fgc": fgc, "mask": mask}

    def _masked_views(self, tokens: torch.Tensor, r: int, noise: torch.Tensor | None):
        """r disjoint masked views of (B, L, D) tokens through encoder and decoder:
        (r, B, L, P) predicted patches, (r, B, Dd) decoder class tokens, (r, B, L) masks."""
        b, n, dim = tokens.shape
        k = self.num_visible
        if noise is None:
            noise = torch.rand(b, n, device=tokens.device)
        ids_vis = visible_ids(noise, r, k)  # (r, B, k)
        # All r views go through the encoder as one batch of r*B sequences of k tokens.
        views = tokens.unsqueeze(0).expand(r, -1, -1, -1)  # (r, B, L, D)
        visible = views.gather(2, ids_vis.unsqueeze(-1).expand(-1, -1, -1, dim))  # (r, B, k, D)
        latent = self.encode(visible.reshape(r * b, k, dim))  # (r*B, 1 + k, D)
        slots = decoder_slots(ids_vis, n).reshape(r * b, n)  # (r*B, L)
        pred, dec_cls = self.decode(latent, slots)  # (r*B, L, P), (r*B, Dd)
        return pred.reshape(r, b, n, -1), dec_cls.reshape(r, b, -1), masks_from_ids(ids_vis, n)

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, mask_views: int = 1, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's pictures: (r, B, C, H, W) reconstructions of r disjoint masked views, in
        the input's normalisation (per-patch statistics put back for norm_pix_loss models), and
        the (r, B, L) masks (True = hidden)."""
        if not self.has_decoder:
            raise ValueError("a model without a decoder (vit_*) reconstructs nothing")
        pred, _, mask = self._masked_views(self.embed(images), mask_views, noise)
        pred = pred.float()
        if self.norm_pix_loss:
            mean, std = _patch_stats(self.patchify(images).float())
            pred = pred * std + mean
        r, b = mask.shape[:2]
        return self.unpatchify(pred.reshape(r * b, *pred.shape[2:])).reshape(
            r, b, *images.shape[1:]
        ), mask


def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of (..., L, P) pixels: MAE's norm_pix_loss target statistics."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5


def consistency_loss(cls_out: torch.Tensor, offdiag_weight: float = 0.005) -> torch.Tensor:
    """FGCR's feature consistency between the r decoder cls outputs (r, B, Dd).

    z = stopgrad(mean over views); each c_i and z standardised over the batch (unbiased std);
    C_i = c_i^T z / B; loss = mean_i [sum_j (C_jj - 1)^2 + w * sum_{j != k} (C_jk + 1)^2].
    The off-diagonal term pushes towards -1, not 0 as in Barlow Twins: that is what the published
    FGCR code computes, and we keep it so results are comparable.
    """
    r, b, _ = cls_out.shape
    if b < 2:
        raise ValueError(
            f"the FGCR consistency loss standardises over the batch: needs B >= 2, got {b}"
        )
    cls_out = cls_out.float()
    z = cls_out.mean(dim=0).detach()  # (B, Dd)
    z = (z - z.mean(dim=0)) / z.std(dim=0)
    c = (cls_out - cls_out.mean(dim=1, keepdim=True)) / cls_out.std(dim=1, keepdim=True)
    corr = torch.einsum("rbj,bk->rjk", c, z) / b  # (r, Dd, Dd)
    diag = torch.diagonal(corr, dim1=1, dim2=2)  # (r, Dd)
    on = (diag - 1).pow(2).sum(dim=-1)
    off = (corr + 1).pow(2).sum(dim=(1, 2)) - (diag + 1).pow(2).sum(dim=-1)
    return (on + offdiag_weight * off).mean()
