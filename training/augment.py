"""Batched augmentation in plain torch, for chest films (no horizontal flips: anatomy is not
symmetric). Small rotations, zooms and shifts as from patient positioning, plus a mild gamma
jitter for differences in film processing that equalisation does not fully remove."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(images: torch.Tensor, generator: torch.Generator,
                  max_rotation_degrees: float = 10.0, max_zoom: float = 0.10,
                  max_shift: float = 0.06, max_log_gamma: float = 0.25) -> torch.Tensor:
    """images: [N, 1, H, W] in [0, 1] -> augmented copy, same shape and range."""
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(count, generator=generator) * (high - low) + low

    angle = uniform(-max_rotation_degrees, max_rotation_degrees) * math.pi / 180
    scale = 1.0 / uniform(1 - max_zoom, 1 + max_zoom)
    shift_x, shift_y = uniform(-max_shift, max_shift) * 2, uniform(-max_shift, max_shift) * 2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1),
                         torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                           align_corners=False)
    gamma = torch.exp(uniform(-max_log_gamma, max_log_gamma)).view(count, 1, 1, 1)
    return warped.clamp(1e-6, 1.0).pow(gamma)


# ---------------------------------------------------------------------------------------------
# The robust recipe: shifts applied to the films' own grey levels, then the service's rank
# equalisation, so a black border or a tight crop changes the equalised picture exactly as it
# would for a real film. Covers what training.shifts stresses: field of view (crop, zoom out
# with black, white or mirrored borders, off centre, aspect), rotation, blur and edge
# enhancement, noise, burned-in markers.

def equalize_batch(images: torch.Tensor) -> torch.Tensor:
    """Batched pacs_ai.model.preprocessing.equalize_histogram: each value -> its mid-rank in (0, 1), equal
    values equal output (exactly: binning the grey levels instead was faster but moved smooth
    dark regions by up to 0.05). [N, 1, H, W] -> same shape."""
    count = images.shape[0]
    flat = images.reshape(count, -1)
    length = flat.shape[1]
    ordered, order = torch.sort(flat, dim=1)
    position = torch.arange(length).expand(count, length)
    differs = ordered[:, 1:] != ordered[:, :-1]
    edge = torch.ones(count, 1, dtype=torch.bool)
    # first index of each run of equal values (= how many values are smaller) ...
    first = torch.cummax(torch.where(torch.cat([edge, differs], 1), position, 0), dim=1).values
    # ... and its last index, found the same way from the other end
    ends_reversed = torch.cat([differs, edge], 1).flip(1)
    last = length - 1 - torch.cummax(torch.where(ends_reversed, position, 0), dim=1).values.flip(1)
    mid_rank = (first + last + 1).to(torch.float32) / (2.0 * length)
    return torch.empty_like(flat).scatter_(1, order, mid_rank).reshape(images.shape)


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(count, generator=generator) * (high - low) + low


def _log_uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.exp(_uniform(count, math.log(low), math.log(high), generator))


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per image; sigma 0 leaves it as it is."""
    count, _, height, width = images.shape
    radius = 6
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    safe = sigma.clamp(min=1e-3).view(count, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / safe) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (offsets == 0).float().view(1, -1)
    kernel = torch.where((sigma > 0).view(count, 1), kernel, identity)
    grouped = images.reshape(1, count, height, width)
    grouped = F.pad(grouped, (radius, radius, radius, radius), mode="replicate")
    grouped = F.conv2d(grouped, kernel.view(count, 1, 1, -1), groups=count)
    grouped = F.conv2d(grouped, kernel.view(count, 1, -1, 1), groups=count)
    return grouped.reshape(count, 1, height, width)


def _markers(images: torch.Tensor, chance: float, generator: torch.Generator) -> torch.Tensor:
    """Burned-in white marker plates with dark letter blocks near the corners and edges."""
    count, _, height, width = images.shape
    for index in range(count):
        if torch.rand(1, generator=generator).item() >= chance:
            continue
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            plate_h = int(height * _uniform(1, 0.04, 0.09, generator))
            plate_w = int(width * _uniform(1, 0.04, 0.35, generator))
            near_right = bool(torch.rand(1, generator=generator) < 0.5)
            near_bottom = bool(torch.rand(1, generator=generator) < 0.5)
            x = int(width * _uniform(1, 0.01, 0.12, generator))
            y = int(height * _uniform(1, 0.01, 0.12, generator))
            x = width - x - plate_w if near_right else x
            y = height - y - plate_h if near_bottom else y
            images[index, 0, y:y + plate_h, x:x + plate_w] = 1.0
            inset = max(1, plate_h // 5)
            images[index, 0, y + inset:y + plate_h - inset, x + inset:x + plate_w - inset] = 0.15
    return images


def augment_pictures(pictures: torch.Tensor, generator: torch.Generator,
                     output_size: int = 200) -> torch.Tensor:
    """pictures: [N, H, W] uint8 grey levels -> equalised model inputs [N, 1, S, S] in (0, 1).

    The ranges are set to cover the stress test's shifts with margin (a window of 0.6-1.3 of the
    film's side: 20 % cropped to 15 % of border per side), not tuned on its figures."""
    images = pictures.unsqueeze(1).to(torch.float32) / 255.0
    count = images.shape[0]

    # field of view: the sampled window's half-size and centre, in the film's [-1, 1] coordinates
    side = _log_uniform(count, 0.6, 1.3, generator)
    aspect = _log_uniform(count, 0.75, 1.33, generator)
    scale_x, scale_y = side * aspect.sqrt(), side / aspect.sqrt()
    centre_x, centre_y = _uniform(count, -0.15, 0.15, generator), _uniform(count, -0.15, 0.15, generator)
    angle = _uniform(count, -10, 10, generator) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * scale_x, -sin * scale_y, centre_x], 1),
                         torch.stack([sin * scale_x, cos * scale_y, centre_y], 1)], 1)
    grid = F.affine_grid(theta, [count, 1, output_size, output_size], align_corners=False)
    # gamma before the border fill: a monotonic change is invisible after equalisation on its
    # own, but it moves the film's grey levels against a black or white frame
    images = images.clamp(1e-6, 1).pow(_log_uniform(count, 0.6, 1.6, generator).view(count, 1, 1, 1))
    mirrored = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)
    inside = F.grid_sample(torch.ones_like(images), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    fill_choice = torch.rand(count, generator=generator).view(count, 1, 1, 1)
    fill = torch.where(fill_choice < 0.5, 0.0, 1.0)  # black frame half the time, else white
    framed = mirrored * inside + fill * (1 - inside)
    images = torch.where(fill_choice < 0.8, framed, mirrored)  # 20 %: the film's edge continued

    # texture: blur (soft detector, heavy noise reduction) or unsharp masking (edge enhancement)
    texture = torch.rand(count, generator=generator)
    sigma = torch.where(texture < 0.25, _uniform(count, 0.3, 2.0, generator),
                        torch.where(texture < 0.5, _uniform(count, 1.0, 3.0, generator),
                                    torch.zeros(count)))
    blurred = _gaussian_blur(images, sigma)
    amount = _uniform(count, 0.5, 2.0, generator).view(count, 1, 1, 1)
    sharpened = (images + amount * (images - blurred)).clamp(0, 1)
    images = torch.where((texture < 0.25).view(count, 1, 1, 1), blurred,
                         torch.where((texture < 0.5).view(count, 1, 1, 1), sharpened, images))

    # quantum noise on a third of the films
    noisy = torch.rand(count, generator=generator) < 0.3
    noise_sigma = (_uniform(count, 1.0, 10.0, generator) / 255.0 * noisy).view(count, 1, 1, 1)
    images = (images + noise_sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)

    images = _markers(images, 0.3, generator)
    return equalize_batch(images)
