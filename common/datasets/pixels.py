"""uint8 pixels -> normalized float32 tensors, as torchvision's ToTensor + Normalize would."""

from __future__ import annotations

import numpy as np
import torch


def normalize(images, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [n,H,W,C] (or [n,H,W], one channel) -> float32 [n,C,H,W]: /255, then per-channel
    (x - mean) / std."""
    arr = np.ascontiguousarray(np.asarray(images))
    if arr.ndim == 3:
        arr = arr[..., None]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32).contiguous().div_(255.0)
    c = x.shape[1]
    return x.sub_(torch.tensor(mean).view(1, c, 1, 1)).div_(torch.tensor(std).view(1, c, 1, 1))
