"""The RPN layers' random subsampling: the original's ``npr.choice`` on a seeded generator of ours.

The original layers draw from numpy's global ``npr`` (seeded once by ``train_net.py``). Ours
each own an ``np.random.RandomState`` (``layer_rng``: seeded by ``RNG_SEED`` and the layer's
name, so two layers never share a stream), like ``RoIDataLayer``'s planner; it is the layer's
``rng`` attribute, which a caller may replace. ``choice`` makes exactly the draw
``rng.choice(inds, size, replace=False)`` makes (legacy numpy: ``inds[rng.permutation(n)[:size]]``),
so with the same generator state our layers pick the same anchors and RoIs as the original.
Only the permutation is drawn on the host; the candidates stay on their device.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def layer_rng(seed: int, layer_name: str) -> np.random.RandomState:
    """A generator for one layer: ``RandomState([seed, crc32(layer_name)])``."""
    return np.random.RandomState([int(seed) & 0xFFFFFFFF, zlib.crc32(layer_name.encode())])


def choice(inds: torch.Tensor, size: int, rng: np.random.RandomState) -> torch.Tensor:
    """``rng.choice(inds, size, replace=False)`` for a (N,) tensor: (size,) on ``inds``' device."""
    perm = rng.permutation(int(inds.numel()))[: int(size)]
    return inds[torch.from_numpy(perm).to(inds.device)]


def rng_state(rng: np.random.RandomState) -> dict:
    """The generator's state, JSON-friendly (for a training snapshot)."""
    name, keys, pos, has_gauss, gauss = rng.get_state()
    return dict(name=name, keys=keys.tolist(), pos=int(pos), has_gauss=int(has_gauss),
                cached_gaussian=float(gauss))


def set_rng_state(rng: np.random.RandomState, state: dict) -> None:
    """Continue from an ``rng_state()``."""
    rng.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                   state["has_gauss"], state["cached_gaussian"]))
