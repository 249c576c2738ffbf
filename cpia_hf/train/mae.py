"""MAE (He et al. 2022): reconstruct the pixels of masked patches from the visible quarter.

Follows facebookresearch/mae `models_mae.py` and `main_pretrain.py`. The encoder is the timm ViT
itself (its patch embedding, class token, blocks and final norm), so the published encoder is a
plain timm checkpoint. Differences from the official code:
- the 2-D sin-cos position tables come from timm's `build_sincos2d_pos_embed`; its channel order
  (sin h, sin w, cos h, cos w) differs from MAE's numpy helper, which is immaterial for a fixed table;
- the decoder's prediction head runs on masked tokens only (the loss ignores the others), which
  saves a little time and changes nothing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import VisionTransformer
from timm.models.vision_transformer import Block
from torch import nn

from ..model.backbone import create_backbone
from .augment import AugmentConfig, MAEView
from .method import PretrainMethod


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos table (1, [1 +] H*W, dim); the class token's row is zeros, as in MAE."""
    table = build_sincos2d_pos_embed(list(grid_size), dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table.unsqueeze(0)


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAE(PretrainMethod):
    """Masked autoencoder over a timm ViT encoder with a light transformer decoder."""

    name = "mae"
    allows_grad_accum = True  # the loss is a mean over images: micro-batches add up to the large batch
    option_help = {
        "mask_ratio": "fraction of patches hidden from the encoder",
        "norm_pix_loss": "1: per-patch normalised pixel targets, 0: raw pixels",
        "decoder_dim": "decoder width",
        "decoder_depth": "decoder blocks",
        "decoder_heads": "decoder attention heads",
    }

    def __init__(
        self,
        model: str = "vit_small_patch16_224",
        *,
        img_size: int = 224,
        init: str | None = None,
        model_kwargs: dict | None = None,
        drop_path: float = 0.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ):
        """`model` (timm ViT, `model_kwargs` overrides, `init` pretrained tag) at `img_size` is the
        encoder; the options are `models_mae.MaskedAutoencoderViT`'s (decoder_embed_dim = decoder_dim)."""
        super().__init__()
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder, self.backbone_spec = create_backbone(
            model, img_size=img_size, init=init, model_kwargs=model_kwargs, drop_path_rate=drop_path)
        encoder = self.encoder
        dim = encoder.embed_dim
        self.patch_size = encoder.patch_embed.patch_size[0]
        grid = encoder.patch_embed.grid_size

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(grid, decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=encoder.norm.__class__) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)

        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_mae_weights)
        if init is None:
            encoder.apply(init_mae_weights)
            # Patch embedding initialised like a linear layer on the flattened patch, as in MAE.
            nn.init.xavier_uniform_(encoder.patch_embed.proj.weight.view(dim, -1))
            nn.init.normal_(encoder.cls_token, std=0.02)
            with torch.no_grad():  # fixed 2-D sin-cos table; pretrained weights keep their own, trainable
                encoder.pos_embed.copy_(sincos_pos_embed(grid, dim))
            encoder.pos_embed.requires_grad_(False)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def make_transform(cls, augment: AugmentConfig) -> Callable:
        return MAEView(augment)

    def export_backbone(self) -> VisionTransformer:
        return self.encoder

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3), patch pixels in (row, column, channel) order."""
        p = self.patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the (1 - mask_ratio) of the tokens with the lowest `noise` (B, L) (default uniform).

        x (B, L, D) -> kept tokens (B, K, D), mask (B, L) 1 on removed tokens, ids_restore (B, L).
        """
        b, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> latent (B, 1 + K, D) of the class token and the K kept patches,
        mask (B, L), ids_restore (B, L)."""
        encoder = self.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = encoder.blocks(torch.cat([cls, x], dim=1))
        return encoder.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, D) -> predicted pixels of the masked patches (M, p*p*3), M = mask.sum(),
        in batch then patch order (the head runs on masked tokens only; the loss ignores the rest)."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:][mask.bool()])

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only: images (B, 3, H, W), pred (M, p*p*3),
        mask (B, L) with M ones; targets per-patch normalised when `norm_pix_loss`."""
        target = self.patchify(images)[mask.bool()]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred.float() - target.float()) ** 2).mean()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore, mask)
        return self.forward_loss(images, pred, mask)
