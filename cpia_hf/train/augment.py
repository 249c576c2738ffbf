"""Pathology augmentations and the view makers of each pre-training method.

Histology has no canonical orientation and its colour varies with the stain batch and scanner, so
every method flips (also vertically) and rotates by multiples of 90 degrees, and the contrastive
methods use a moderate colour jitter or an HED stain jitter in place of the strong ImageNet jitter.
Solarization is off unless asked for: it produces colours no stained slide shows. Against the
official DINO / MoCo-v3 views (jitter 0.4/0.4/0.2/0.1, grayscale 0.2) the defaults here are a 0.2
jitter and grayscale 0.1, since stain colour carries diagnostic signal.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, v2

from .settings import setting

# Ruifrok & Johnston optical densities of haematoxylin, eosin and DAB (rows), as used by
# skimage.color.rgb2hed; written out here so that scikit-image need not be a dependency for two
# 3x3 matrix products.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
OD_EPS = 1e-6


@dataclass(kw_only=True)
class AugmentConfig:
    """Augmentation settings of a run (recorded in the model card); `crop_scale` is the method's."""

    img_size: int = setting(224, help="input side", group="augmentation")
    crop_scale: tuple[float, float] = setting(help="RandomResizedCrop scale", metavar="MIN,MAX", group="augmentation")
    local_crop_scale: tuple[float, float] = setting((0.05, 0.4), help="DINO local crop scale", metavar="MIN,MAX",
                                                    group="augmentation")
    local_size: int = setting(96, help="DINO local crop side", group="augmentation")
    local_crops: int = setting(8, help="DINO local crops", group="augmentation")
    vertical_flip: bool = setting(True, help="vertical flips", flag="")
    rotate90: bool = setting(True, help="90-degree rotations", flag="")
    color_jitter: float = setting(0.2, help="brightness/contrast jitter strength", group="augmentation")
    stain_jitter: float = setting(0.0, help="HED stain jitter sigma, e.g. 0.05", group="augmentation")
    grayscale: float = setting(0.1, help="grayscale probability", group="augmentation")
    blur: bool = setting(True, help="no Gaussian blur", group="augmentation")
    solarize: bool = setting(False, help="solarize the second view", group="augmentation")
    mean: tuple[float, float, float] = setting(IMAGENET_DEFAULT_MEAN, flag="",
                                               help="input normalisation mean (--init: the weights' own)")
    std: tuple[float, float, float] = setting(IMAGENET_DEFAULT_STD, flag="",
                                              help="input normalisation std (--init: the weights' own)")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, method: str) -> list[str]:
        """The augmentations `method` applies, in words (for the model card)."""
        crop = f"random resized crop {self.img_size} px, scale {self.crop_scale[0]}-{self.crop_scale[1]}"
        if method == "dino":
            crop = f"2 global crops: {crop}; {self.local_crops} local crops {self.local_size} px, " \
                   f"scale {self.local_crop_scale[0]}-{self.local_crop_scale[1]}"
        elif method == "mocov3":
            crop = f"2 views: {crop}"
        steps = [crop, "horizontal flip" + (" and vertical flip" if self.vertical_flip else "")]
        if self.rotate90:
            steps.append("90-degree rotations")
        if method != "mae":
            if self.color_jitter > 0:
                steps.append(f"colour jitter {self.color_jitter} (p=0.8)")
            if self.stain_jitter > 0:
                steps.append(f"HED stain jitter sigma {self.stain_jitter}")
            if self.grayscale > 0:
                steps.append(f"grayscale (p={self.grayscale})")
            if self.blur:
                steps.append("Gaussian blur (asymmetric across views)")
            if self.solarize:
                steps.append("solarization of the second view (p=0.2)")
        return steps


class RandomRotate90(torch.nn.Module):
    """Rotate by a uniformly drawn multiple of 90 degrees (torchvision has no lossless variant)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


class RandomHEDJitter(torch.nn.Module):
    """Stain jitter (Tellez et al. 2018): scale and shift each HED optical-density channel.

    Works on float RGB in [0, 1]; `sigma` bounds both the multiplicative (1 +- sigma) and the additive
    (+- sigma) perturbation.
    """

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        optical_density = -torch.log(image.clamp(min=OD_EPS)).movedim(-3, -1)
        hed = optical_density @ HED_FROM_RGB
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        optical_density = (hed * alpha + beta) @ RGB_FROM_HED
        return torch.exp(-optical_density).movedim(-1, -3).clamp(0, 1)


def _view(
    cfg: AugmentConfig,
    size: int,
    scale: tuple[float, float],
    *,
    color: bool,
    blur_p: float = 0.0,
    solarize_p: float = 0.0,
) -> v2.Compose:
    """One augmented view: crop, orientation, optional colour / blur / solarize, normalise."""
    steps: list[torch.nn.Module] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if cfg.vertical_flip:
        steps.append(v2.RandomVerticalFlip())
    if cfg.rotate90:
        steps.append(RandomRotate90())
    if color and cfg.color_jitter > 0:
        strength = cfg.color_jitter
        # Ratios of the official 0.4/0.4/0.2/0.1 jitter, scaled down: hue shifts of stained tissue
        # are small in practice, so the hue term stays a quarter of the brightness term.
        jitter = v2.ColorJitter(strength, strength, strength / 2, strength / 4)
        steps.append(v2.RandomApply([jitter], p=0.8))
    if color and cfg.grayscale > 0:
        steps.append(v2.RandomGrayscale(p=cfg.grayscale))
    if blur_p > 0:
        kernel = max(3, (size // 10) | 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if color and cfg.stain_jitter > 0:
        steps.append(RandomHEDJitter(cfg.stain_jitter))
    steps.append(v2.Normalize(cfg.mean, cfg.std))
    return v2.Compose(steps)


class MAEView:
    """MAE: a single crop (official recipe: RandomResizedCrop(0.2, 1) and flip, no colour)."""

    def __init__(self, cfg: AugmentConfig):
        self.view = _view(cfg, cfg.img_size, cfg.crop_scale, color=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.view(image)


class TwoViews:
    """MoCo-v3: two crops, asymmetric blur (1.0 / 0.1) and solarize (0 / 0.2 when enabled)."""

    def __init__(self, cfg: AugmentConfig):
        solarize = 0.2 if cfg.solarize else 0.0
        self.views = (
            _view(cfg, cfg.img_size, cfg.crop_scale, color=True, blur_p=1.0 if cfg.blur else 0.0),
            _view(cfg, cfg.img_size, cfg.crop_scale, color=True, blur_p=0.1 if cfg.blur else 0.0, solarize_p=solarize),
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]


class MultiCrop:
    """DINO: two global crops (blur 1.0 / 0.1, solarize 0 / 0.2 when enabled) and N local crops (blur 0.5)."""

    def __init__(self, cfg: AugmentConfig):
        solarize = 0.2 if cfg.solarize else 0.0
        blur = 1.0 if cfg.blur else 0.0
        self.global_views = (
            _view(cfg, cfg.img_size, cfg.crop_scale, color=True, blur_p=blur),
            _view(cfg, cfg.img_size, cfg.crop_scale, color=True, blur_p=blur * 0.1, solarize_p=solarize),
        )
        self.local_view = _view(cfg, cfg.local_size, cfg.local_crop_scale, color=True, blur_p=blur * 0.5)
        self.local_crops = cfg.local_crops

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [view(image) for view in self.global_views]
        crops += [self.local_view(image) for _ in range(self.local_crops)]
        return crops
