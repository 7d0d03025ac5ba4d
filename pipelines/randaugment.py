"""RandAugment with timm's semantics, batched on the device with per-image randomness.

timm's `rand-m9-mstd0.5-inc1` (what MAE / SSAT fine-tune with): for every image, `n` ops drawn
with replacement from the 15 "increasing" ops, each applied with probability `p` (0.5) at a
magnitude drawn from N(m, mstd) clipped to [0, mmax], signed ops negated with probability 0.5.
timm runs PIL on one image at a time in the loader's workers; here each op runs once per batch on
the images that drew it, on float tensors holding 0-255 values, reproducing PIL's arithmetic
(blends truncate, lookups are integer, geometry maps pixel centres as PIL's affine transform
does, with its bicubic kernel, and fills with the dataset's mean colour).
`tests/test_randaugment.py` checks each op against timm's own PIL implementation on real photos.

Random draws happen on the host (a few numbers per image), so the device never waits for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_SIGNED = {
    "Rotate",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
}
_LEVEL_DENOM = 10.0
_TRANSLATE_PCT = 0.45


@dataclass(frozen=True)
class RandAugmentConfig:
    magnitude: float = 9
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.5
    magnitude_max: float = _LEVEL_DENOM

    @classmethod
    def parse(cls, config: str) -> "RandAugmentConfig":
        """timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (only the increasing op set):
        'rand', then sections of a key and its number, joined by '-'."""
        parts = config.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand-', got {config!r}")
        values: dict = {}
        for part in parts[1:]:
            section = re.fullmatch(r"([a-z]+)(.*)", part)
            if section is None:
                what = f"section {part!r}" if part else "an empty section"
                raise ValueError(
                    f"RandAugment config {config!r}: {what} is not a key and a number; "
                    f"expected timm's form, e.g. 'rand-m9-mstd0.5-inc1'"
                )
            key, value = section.groups()
            if key not in _SECTIONS:
                raise ValueError(f"unsupported RandAugment config section {part!r} in {config!r}")
            name, kind = _SECTIONS[key]
            if not re.fullmatch(r"\d+" if kind is int else r"\d+(\.\d*)?", value):
                number = "a whole number" if kind is int else "a number"
                raise ValueError(
                    f"RandAugment config {config!r}: section {part!r} needs {number} after "
                    f"{key!r}; expected timm's form, e.g. 'rand-m9-mstd0.5-inc1'"
                )
            values[name] = kind(value)
        if "magnitude_std" in values and values["magnitude_std"] > 100:
            values["magnitude_std"] = float("inf")  # timm: a magnitude uniform in [0, m]
        if not values.pop("increasing", False):
            raise ValueError(f"only the increasing op set (inc1) is implemented, got {config!r}")
        return cls(**values)


# timm's config sections: key -> (field, type of its number)
_SECTIONS = {
    "m": ("magnitude", float),
    "n": ("num_layers", int),
    "p": ("prob", float),
    "mstd": ("magnitude_std", float),
    "mmax": ("magnitude_max", float),
    "inc": ("increasing", int),
}


# ----------------------------------------------------------------------------- point ops
def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601-2 with its integer rounding): (n, 3, H, W) -> (n, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + factor * (x - degenerate), clipped, truncated."""
    out = degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)
    return out.clamp(0, 255).floor()


def _lookup(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel lookup table (n, 3, 256) applied to x (n, 3, H, W)."""
    n, c, h, w = x.shape
    out = lut.gather(2, x.reshape(n, c, h * w).long().clamp(0, 255))
    return out.reshape(n, c, h, w).to(x.dtype)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    idx = x.reshape(n, c, h * w).long().clamp(0, 255)
    return torch.zeros(n, c, 256, device=x.device, dtype=torch.long).scatter_add_(
        2, idx, torch.ones_like(idx)
    )


def auto_contrast(x, _level):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, device=x.device, dtype=x.dtype).view(1, 1, 256)
    lut = torch.trunc(levels * scale.squeeze(-1) - lo.squeeze(-1) * scale.squeeze(-1)).clamp(0, 255)
    flat = (hi <= lo).squeeze(-1)  # one grey level: PIL leaves the channel as it is
    lut = torch.where(flat, levels.expand_as(lut), lut)
    return _lookup(x, lut.long())


def equalize(x, _level):
    hist = _histogram(x)  # (n, 3, 256)
    total = hist.sum(-1, keepdim=True)
    levels = torch.arange(256, device=x.device)
    last = (
        levels.expand_as(hist).masked_fill(hist == 0, -1).amax(-1, keepdim=True)
    )  # top level used
    step = (total - hist.gather(-1, last.clamp(min=0))) // 255
    before = hist.cumsum(-1) - hist  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(0, 255)
    identity = (step == 0) | ((hist > 0).sum(-1, keepdim=True) <= 1)
    lut = torch.where(identity, levels.expand_as(lut), lut)
    return _lookup(x, lut)


def invert(x, _level):
    return 255.0 - x


def posterize(x, bits):
    shift = (2.0 ** (8 - bits)).view(-1, 1, 1, 1)
    return torch.floor(x / shift) * shift


def solarize(x, thresh):
    return torch.where(x >= thresh.view(-1, 1, 1, 1), 255.0 - x, x)


def solarize_add(x, add):
    return torch.where(x < 128, (x + add.view(-1, 1, 1, 1)).clamp(max=255), x)


def color(x, factor):
    return _blend(_grey(x).expand_as(x), x, factor)


def contrast(x, factor):
    mean = torch.floor(_grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x, factor):
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype)
    kernel = kernel.to(x.device, non_blocking=True) / 13  # without waiting for the GPU
    smooth = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), kernel.view(1, 1, 3, 3))
    smooth = torch.floor(smooth + 0.5).reshape(x.shape[0], 3, x.shape[2] - 2, x.shape[3] - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # PIL leaves the border pixels unfiltered
    return _blend(degenerate, x, factor)


# ---------------------------------------------------------------------------- geometry
def _cubic_weight(t: torch.Tensor) -> torch.Tensor:
    """The cubic convolution kernel PIL's affine transforms use (a = -1)."""
    t = t.abs()
    near = 1 - 2 * t**2 + t**3
    far = 4 - 8 * t + 5 * t**2 - t**3
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _bicubic(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Sample x (n, C, H, W) at continuous points src (n, h, w, 2) (pixel centres at +0.5) with
    PIL's bicubic filter: 4x4 neighbours, coordinates clamped to the image."""
    n, c, h, w = x.shape
    sx, sy = src[..., 0] - 0.5, src[..., 1] - 0.5
    x0, y0 = torch.floor(sx), torch.floor(sy)
    dx, dy = sx - x0, sy - y0
    flat = x.reshape(n, c, h * w)
    out = torch.zeros(n, c, src.shape[1] * src.shape[2], device=x.device, dtype=x.dtype)
    for j in range(-1, 3):
        wy = _cubic_weight(dy - j)
        row = (y0 + j).clamp(0, h - 1).long() * w
        for i in range(-1, 3):
            weight = (wy * _cubic_weight(dx - i)).reshape(n, 1, -1)
            index = (row + (x0 + i).clamp(0, w - 1).long()).reshape(n, 1, -1).expand(-1, c, -1)
            out += weight * flat.gather(2, index)
    return out.reshape(n, c, src.shape[1], src.shape[2])


def _affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's affine transform: output pixel centre p maps to input point A @ p + t (pixel
    centres at +0.5), bicubic inside the image, `fill` where the point falls outside it.
    matrix: (n, 2, 3) as PIL's (a, b, c, d, e, f)."""
    n, _, h, w = x.shape
    # Coordinates in float64, as PIL computes them: whether a point 31.5 px away lands on the
    # image edge or just outside it must not depend on float32 rounding.
    f64 = torch.float64
    ys, xs = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=f64) + 0.5,
        torch.arange(w, device=x.device, dtype=f64) + 0.5,
        indexing="ij",
    )
    centres = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (H, W, 3)
    src = torch.einsum("nij,hwj->nhwi", matrix.to(f64), centres)  # (n, H, W, 2) pixels
    inside = (src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)
    out = _bicubic(x, src.to(x.dtype)).clamp(0, 255).trunc()
    return torch.where(inside.unsqueeze(1), out, fill.view(1, 3, 1, 1))


def _matrix(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2)


def rotate(x, degrees, fill):
    n, _, h, w = x.shape
    angle = -torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    # PIL's Image.rotate: rotation about the centre, in output -> input form
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return _affine(x, _matrix(cos, sin, c, -sin, cos, f), fill)


def shear_x(x, factor, fill):
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return _affine(x, _matrix(one, factor, zero, zero, one, zero), fill)


def shear_y(x, factor, fill):
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return _affine(x, _matrix(one, zero, zero, factor, one, zero), fill)


def translate_x_rel(x, pct, fill):
    one, zero = torch.ones_like(pct), torch.zeros_like(pct)
    return _affine(x, _matrix(one, zero, pct * x.shape[3], zero, one, zero), fill)


def translate_y_rel(x, pct, fill):
    one, zero = torch.ones_like(pct), torch.zeros_like(pct)
    return _affine(x, _matrix(one, zero, zero, zero, one, pct * x.shape[2]), fill)


# ------------------------------------------------------------------ magnitude -> argument
def level_argument(name: str, magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's level functions, vectorised: magnitude (n,) in [0, mmax], sign (n,) of +-1."""
    level = magnitude / _LEVEL_DENOM
    if name == "Rotate":
        return level * 30.0 * sign
    if name.endswith("Increasing") and name[:-10] in (
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
    ):
        return 1.0 + level * 0.9 * sign
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4)
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(level * 256), max=256)
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(level * 110), max=128)
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return level * _TRANSLATE_PCT * sign
    return level  # AutoContrast, Equalize, Invert take no argument


_POINT = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness,
}
_GEOMETRIC = {
    "Rotate": rotate,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


def apply_op(
    name: str, x: torch.Tensor, argument: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """One op on images x (n, 3, H, W) holding 0-255 values, with per-image arguments (n,)."""
    if name in _GEOMETRIC:
        return _GEOMETRIC[name](x, argument.double(), fill)
    return _POINT[name](x, argument.to(x.dtype))


class RandAugment:
    """Batched RandAugment. `fill`: the colour geometric ops fill with (0-255, timm uses the
    dataset mean)."""

    def __init__(
        self,
        config: RandAugmentConfig | str = "rand-m9-mstd0.5-inc1",
        fill: tuple[float, float, float] = (124, 116, 104),
    ):
        self.config = RandAugmentConfig.parse(config) if isinstance(config, str) else config
        self.fill = torch.tensor([float(round(v)) for v in fill])

    def draw(self, n: int, generator: torch.Generator | None = None):
        """Host-side choices for n images: op index, applied, magnitude, sign; (layers, n) each."""
        cfg = self.config
        shape = (cfg.num_layers, n)
        ops = torch.randint(len(OPS), shape, generator=generator)
        applied = torch.rand(shape, generator=generator) < cfg.prob
        # float64, as timm's Python floats: a translation of exactly 31.5 px must stay 31.5
        magnitude = torch.full(shape, float(cfg.magnitude), dtype=torch.float64)
        if cfg.magnitude_std == float("inf"):
            magnitude = torch.rand(shape, generator=generator, dtype=torch.float64) * cfg.magnitude
        elif cfg.magnitude_std > 0:
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            magnitude = magnitude + noise * cfg.magnitude_std
        magnitude = magnitude.clamp(0, cfg.magnitude_max)
        sign = torch.where(torch.rand(shape, generator=generator) > 0.5, -1.0, 1.0).double()
        return ops, applied, magnitude, sign

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, 3, H, W) float with 0-255 values, on any device; returns a new tensor."""
        ops, applied, magnitude, sign = self.draw(x.shape[0], generator)
        fill = self.fill.to(x.device, x.dtype, non_blocking=True)  # without waiting for the GPU
        x = x.clone()
        for layer in range(self.config.num_layers):
            for k, name in enumerate(OPS):
                chosen = torch.nonzero((ops[layer] == k) & applied[layer]).flatten()  # host
                if len(chosen) == 0:
                    continue
                argument = level_argument(name, magnitude[layer, chosen], sign[layer, chosen])
                index = chosen.to(x.device, non_blocking=True)
                x[index] = apply_op(name, x[index], argument.to(x.device, non_blocking=True), fill)
        return x
