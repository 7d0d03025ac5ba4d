"""What happens to a batch once its crops are on the device, shared by every engine.

Train: RandAugment (per image, `pipelines/randaugment.py`), normalisation with the dataset's
mean/std, random erasing (timm's `RandomErasing`, per image), and optionally mixup/cutmix
(timm's `Mixup`, soft targets; all crops of an image get the same mix). Eval: normalisation,
after an optional random perspective warp of each image (the published robustness study).
The crops and flips happen earlier, in the engine, where each image is decoded once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from pipelines.randaugment import RandAugment, RandAugmentConfig

# options with a meaningful range: option, lowest, highest (None: no bound), the ends included
RANGES = (
    ("hflip", 0, 1, "[]"),
    ("reprob", 0, 1, "[]"),
    ("recount", 1, None, "[)"),
    ("mixup", 0, None, "[)"),
    ("cutmix", 0, None, "[)"),
    ("mixup_prob", 0, 1, "[]"),
    ("mixup_switch_prob", 0, 1, "[]"),
    ("smoothing", 0, 1, "[)"),
    ("crop_pct", 0, 1, "(]"),
    ("perspective", 0, 1, "[]"),
)
# options with a few meanings (as timm's flags), and pairs (low, high) with their valid range
CHOICES = {"remode": ("pixel", "rand", "const"), "mixup_mode": ("batch", "pair", "elem")}
PAIRS = {
    "scale": ("0 < MIN <= MAX <= 1 (fractions of the image's area)", lambda a, b: 0 < a <= b <= 1),
    "ratio": ("0 < MIN <= MAX (width / height)", lambda a, b: 0 < a <= b),
    "cutmix_minmax": (
        "0 <= MIN < MAX <= 1 (fractions of the image's sides)",
        lambda a, b: 0 <= a < b <= 1,
    ),
}


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings, named as timm's and MAE's command-line flags."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    aa: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment config; None disables it
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0  # mixup alpha; 0 disables
    cutmix: float = 0.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    # cutmix box side range, as fractions of the image's sides (timm): turns cutmix on, whatever
    # the cutmix alpha (which it overrides)
    cutmix_minmax: tuple[float, float] | None = None
    smoothing: float = 0.1  # label smoothing carried by mixup's soft targets
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, centre crop img_size
    perspective: float = 0.0  # eval: random perspective distortion scale; 0 disables

    @classmethod
    def from_kwargs(cls, **kwargs) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown augmentation option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    def __post_init__(self):
        """An option outside its range is an error here, naming it, for every engine (which
        would each fail its own way, some deep in a worker, or not at all)."""
        for name, low, high, ends in RANGES:
            value = getattr(self, name)
            if not _inside(value, low, high, ends):
                raise ValueError(f"{name}={value!r}: expected {_interval(low, high, ends)}")
        if not isinstance(self.recount, numbers.Integral):
            raise ValueError(f"recount={self.recount!r}: expected a whole number of boxes")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: expected one of {', '.join(choices)}"
                )
        for name, (expected, valid) in PAIRS.items():
            pair = getattr(self, name)
            if name == "cutmix_minmax" and pair is None:
                continue
            if not (_numbers(pair) and len(pair) == 2 and valid(*pair)):
                raise ValueError(f"{name}={pair!r}: expected two numbers, {expected}")
        if isinstance(self.aa, str) and self.aa:  # its error names the section it cannot read
            RandAugmentConfig.parse(self.aa)

    @property
    def mixes(self) -> bool:
        """Mixup or cutmix on: as timm's and MAE's `mixup_active`, a cutmix box range turns
        cutmix on by itself (timm's `Mixup` then draws cutmix boxes in that range)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


def _numbers(values) -> bool:
    return isinstance(values, (tuple, list)) and all(_real(v) for v in values)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _inside(value, low, high, ends: str) -> bool:
    if not _real(value):
        return False
    above = value >= low if ends[0] == "[" else value > low
    return above and (high is None or (value <= high if ends[1] == "]" else value < high))


def _interval(low, high, ends: str) -> str:
    return f"{low} or more" if high is None else f"a number in {ends[0]}{low}, {high}{ends[1]}"


class DeviceAugment:
    """uint8 crops (B, V, H, W, 3) on the device -> normalised crops (V, B, 3, H, W) in `dtype`,
    channels-last, plus soft targets when mixing."""

    def __init__(
        self,
        config: AugmentConfig,
        *,
        train: bool,
        mean,
        std,
        num_classes: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
    ):
        self.dtype = dtype
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = (
            1.0 / std_t,
            -mean_t / std_t,
        )  # (x - mean) / std = x * scale + shift
        self.host = HostRing()
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.randaugment = RandAugment(config.aa, fill=mean) if train and config.aa else None
        self.erasing = (
            RandomErasing(
                config.reprob, mode=config.remode, max_count=config.recount, device=str(device)
            )
            if train and config.reprob > 0
            else None
        )
        self.perspective = config.perspective if not train else 0.0
        if self.perspective:  # its own stream: the same warps for the same seed and rank
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                mode=config.mixup_mode,
                cutmix_minmax=config.cutmix_minmax,
                label_smoothing=config.smoothing,
                num_classes=num_classes,
            )
            if train and config.mixes
            else None
        )

    def __call__(
        self, raw: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, v, h, w, _ = raw.shape
        # float copy with the crops first, so that the V*B images form one channels-last batch
        x = (
            self.host.empty((v, b, h, w, 3))
            if raw.device.type == "cpu"
            else torch.empty((v, b, h, w, 3), dtype=torch.float32, device=raw.device)
        )
        x.copy_(raw.transpose(0, 1))
        images = x.permute(0, 1, 4, 2, 3).reshape(v * b, 3, h, w)  # (V*B, 3, H, W), 0-255
        if self.randaugment is not None:
            images = self.randaugment(images)
        if self.perspective:
            images = random_perspective(images, self.perspective, self.generator)
        images = self._normalise(images)
        if self.erasing is not None:
            images = self.erasing(images)
        targets = None
        if self.mixup is not None:
            # the V crops of an image share its mix: mix (B, V*3, H, W) along the batch
            stacked = images.reshape(v, b, 3, h, w).transpose(0, 1).reshape(b, v * 3, h, w)
            stacked, targets = self.mixup(stacked, labels)
            images = stacked.reshape(b, v, 3, h, w).transpose(0, 1)
        return _channels_last_crops(images.reshape(v, b, 3, h, w), self.dtype), targets

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std in place, one pass. A channels-last batch is one (N*H, W*3) matrix of
        pixel rows, normalised by a (W*3,) row of scales and shifts: a broadcast along the rows
        that vectorises, where a per-channel (1, 3, 1, 1) broadcast over channels-last memory
        does not."""
        n, c, h, w = images.shape
        if not images.is_contiguous(memory_format=torch.channels_last):
            return torch.addcmul(self.shift, images, self.scale, out=images)
        if w not in self._rows:
            self._rows[w] = (self.shift.reshape(c).repeat(w), self.scale.reshape(c).repeat(w))
        shift, scale = self._rows[w]
        rows = images.permute(0, 2, 3, 1).view(n * h, w * c)
        torch.addcmul(shift, rows, scale, out=rows)
        return images


def random_perspective(
    images: torch.Tensor, distortion: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """torchvision's `RandomPerspective(distortion_scale, p=1)` on each image of a batch, as
    the published evaluation applies it to PIL images after the centre crop. images:
    (N, C, H, W), 0-255."""
    n, _, h, w = images.shape
    return warp_perspective(images, perspective_corners(n, h, w, distortion, generator))


def perspective_corners(
    n: int, h: int, w: int, distortion: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Where `RandomPerspective` sends the corners (top-left, top-right, bottom-right,
    bottom-left) of n images: each moves inwards by a whole number of pixels, up to
    `distortion` x half the side, independently along x and y. -> (N, 4, 2) as (x, y)."""
    device = generator.device if generator is not None else torch.device("cpu")
    reach = torch.tensor([distortion * (w // 2), distortion * (h // 2)], device=device).floor()
    shift = (torch.rand(n, 4, 2, device=device, generator=generator) * (reach + 1)).floor()
    inwards = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], device=device)
    return _corners(h, w, device) + inwards * shift


def _corners(h: int, w: int, device) -> torch.Tensor:
    return torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], device=device)


def warp_perspective(images: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Warp each image so that its corners land at `corners` (N, 4, 2), as torchvision's
    `perspective` does to a PIL image: bilinear, with what falls outside the image black."""
    n, _, h, w = images.shape
    device = images.device
    end, start = corners.to(device, torch.float64), _corners(h, w, device).double()
    # the homography taking an output point (an end corner) to its input point (start corner)
    x, y = end[..., 0], end[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    sx, sy = start[:, 0].expand(n, 4), start[:, 1].expand(n, 4)
    rows_x = torch.stack([x, y, one, zero, zero, zero, -sx * x, -sx * y], -1)
    rows_y = torch.stack([zero, zero, zero, x, y, one, -sy * x, -sy * y], -1)
    coeffs = torch.linalg.solve(torch.cat([rows_x, rows_y], 1), torch.cat([sx, sy], 1))
    coeffs = coeffs.float().double()  # as torchvision hands them to PIL: float32
    homography = torch.cat([coeffs, torch.ones_like(coeffs[:, :1])], 1).view(n, 3, 3)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64) + 0.5,
        torch.arange(w, device=device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    centres = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # (H, W, 3) output pixel centres
    src = torch.einsum("nij,hwj->nhwi", homography, centres)
    src = src[..., :2] / src[..., 2:]  # (N, H, W, 2) input points, pixels
    # PIL's bilinear sampling: a point outside the image is black, one inside reads its
    # neighbours with the edges repeated
    inside = (src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)
    grid = src / torch.tensor([w / 2, h / 2], device=device, dtype=torch.float64) - 1
    warped = torch.nn.functional.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return warped * inside.unsqueeze(1)


class HostRing:
    """Float32 host tensors for the CPU device, from a fixed ring of buffers reused in turn.

    CUDA's caching allocator hands a freed batch's memory to the next batch; on the host every
    fresh 100 MB batch would cost the kernel ~25,000 page faults (several times the work of
    filling it). A batch is valid until the next one is requested (`CropLoader`'s rule), so a
    fixed ring serves every batch: a buffer is written again when the ring comes round to it.
    With float32 crops and no RandAugment (which copies) the crops handed out are that buffer.
    """

    size = 2  # no batch is made before it is requested: one buffer keeps the rule, one is margin

    def __init__(self):
        self.buffers = [torch.empty(0, dtype=torch.float32) for _ in range(self.size)]
        self.turn = 0

    def empty(self, shape) -> torch.Tensor:
        """A float32 tensor of `shape` in the ring's next buffer (grown when too small: a
        smaller batch, as eval's last, takes the front of it)."""
        numel = math.prod(shape)
        k, self.turn = self.turn, (self.turn + 1) % self.size
        if self.buffers[k].numel() < numel:
            self.buffers[k] = torch.empty(numel, dtype=torch.float32)
        return self.buffers[k][:numel].view(shape)


def _channels_last_crops(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(V, B, 3, H, W) in `dtype` with channels-last strides (each crop a channels-last batch);
    no copy when x already is."""
    v, b, c, h, w = x.shape
    out = torch.empty((v, b, h, w, c), dtype=dtype, device=x.device).permute(0, 1, 4, 2, 3)
    if x.dtype == dtype and x.stride() == out.stride():
        return x
    return out.copy_(x)
