"""Input noise and model-input preparation (torchvision transforms v2, no Ray, no MLflow).

Images travel between stages as uint8 NHWC arrays (compact, what decoding produces); the model
sees float NCHW normalised on its own device by `to_model_input`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torchvision.transforms import v2

from selftrain.config import NoiseConfig

# ImageNet statistics: the convention of torchvision's models; fine for training from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, noise: NoiseConfig, randaugment: bool) -> v2.Compose:
    """Random crop (+flip) for everyone; RandAugment on top for a noised student.

    Noisy Student (Xie et al. 2020, Sec. 2) noises the student's input with RandAugment; the
    teacher is trained with the standard light augmentation here, and scores un-noised.
    """
    ops: list[v2.Transform] = [v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect")]
    if noise.horizontal_flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment and noise.randaugment_num_ops > 0:
        ops.append(v2.RandAugment(num_ops=noise.randaugment_num_ops, magnitude=noise.randaugment_magnitude))
    return v2.Compose(ops)


def strong_transform(noise: NoiseConfig) -> v2.Compose:
    """What FixMatch's strong view adds to the weak one (Sohn et al. 2020, Sec. 2.3): RandAugment,
    then Cutout, a gray square of up to half the image side (RandomErasing with a square aspect:
    area 1/64 to 1/4 of the image). Applied to the weak view, so both views share one flip and
    shift (a flip-and-shift of its own costs as much as Cutout and adds nothing the strong ops
    do not)."""
    ops: list[v2.Transform] = []
    if noise.randaugment_num_ops > 0:
        ops.append(v2.RandAugment(num_ops=noise.randaugment_num_ops, magnitude=noise.randaugment_magnitude))
    ops.append(v2.RandomErasing(p=1.0, scale=(1 / 64, 1 / 4), ratio=(1.0, 1.0), value=127))
    return v2.Compose(ops)


def contrastive_transform(image_size: int, noise: NoiseConfig, crop_scale_min: float, color_jitter: float,
                          rotation: float = 0.0, shear: float = 0.0, translate: float = 0.0) -> v2.Compose:
    """One view of self-supervised pretraining: SimCLR's augmentation for small images (Chen et
    al. 2020, Sec. B.9: no blur on CIFAR) - a random resized crop of `crop_scale_min` to all of
    the image, a flip where the data allows, colour jitter with p = 0.8 and grayscale with
    p = 0.2. Two calls on one image give the two views.

    With `rotation`, `shear` (degrees) or `translate` (fraction of the side), a random affine
    map comes first: the variation of handwriting and other glyphs, which crops and colour do
    not make (on the built-in digits it lifted the linear probe of a SimCLR backbone from 85% to
    88% at 100 steps; README, "Which pretraining method")."""
    ops: list[v2.Transform] = []
    if rotation or shear or translate:
        ops.append(v2.RandomAffine(degrees=rotation, translate=(translate, translate) if translate else None,
                                   shear=shear or None))
    ops.append(v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True))
    if noise.horizontal_flip:
        ops.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4)], p=0.8))
    ops.append(v2.RandomGrayscale(p=0.2))
    return v2.Compose(ops)


def augment_images(images: np.ndarray, transform: v2.Transform, channels_first: bool = False,
                   seeds: np.ndarray | None = None) -> np.ndarray:
    """uint8 NHWC (or NCHW with `channels_first`) -> augmented uint8 NCHW; each image gets its
    own random ops, drawn from its entry of `seeds` when given (reproducible, whatever process
    runs it; torchvision's transforms draw from torch's global generator), else from the
    process's random state."""
    chw = torch.from_numpy(np.ascontiguousarray(images))
    chw = chw if channels_first else chw.permute(0, 3, 1, 2)
    if seeds is None:
        return torch.stack([transform(image) for image in chw]).numpy()
    out = []
    cpu = torch.default_generator  # what the transforms draw from; torch.manual_seed would also
    for image, seed in zip(chw, seeds):  # seed every device's generator (90 us, not 1 us, each)
        cpu.manual_seed(int(seed))
        out.append(transform(image))
    return torch.stack(out).numpy() if out else np.empty((0, *chw.shape[1:]), dtype=np.uint8)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on `device`, made once: creating them per batch is a blocking copy that
    would wait for all the GPU work queued before it."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # in place before any stream reads them
    return mean, std


def to_model_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> normalised float NCHW, on the tensor's own device."""
    x = images.float().div_(255.0)
    mean, std = _normalisation(x.device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def nhwc_to_nchw(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2)
