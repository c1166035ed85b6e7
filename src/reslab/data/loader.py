"""Batches from an in-memory uint8 Split: shuffled, sharded across ranks, augmented, normalized.

Everything random in an epoch is a pure function of (seed, epoch): a run resumed at an epoch
boundary sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from reslab.data.augment import augment as apply_policy
from reslab.data.augment import erase, get_policy, mix
from reslab.data.bundle import Split
from reslab.errors import ReslabError

# Independent random streams drawn from one (seed, epoch).
_ORDER, _AUGMENT = 0, 1


def normalization(
    mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that `addcmul(shift, x, scale)` is (x/255 - mean)/std on [0, 255] pixels.

    `mean` is per channel, or a C x H x W per-pixel mean (paper section 4.2); `std` None means 1.
    One multiply-add per pixel: the loader and the inference path both normalize this way.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32)
    std = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
    if mean.dim() == 1:
        mean = mean.expand(channels)[:, None, None]
    std = std.expand(channels)[:, None, None]
    return 1.0 / (255.0 * std), -mean / std


def _generator(*entropy: int) -> torch.Generator:
    # SeedSequence mixes the numbers well and identically on every platform.
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    """Iterate (x, y): x normalized float NCHW on `device`, y int64 labels.

    `mean`/`std` are per-channel in [0,1] units (the DataBundle's); `mean` may instead be a
    C x H x W per-pixel mean image (paper section 4.2, `Split.pixel_mean()`), and `std=None`
    skips the division. `flip` forces the policy's horizontal mirror on or off (None: the policy's).

    After the policy and normalization: random erasing with probability `erasing` (the erased
    rectangle becomes the mean), then with `mixup` or `cutmix` (Beta alphas; 0 is off) every batch
    is mixed with itself reversed and y becomes soft targets, N x `num_classes` float.

    Distributed training: each of `world_size` ranks gets every `world_size`-th example of the
    epoch's permutation. Without `drop_last` the permutation is first padded with its own first
    examples up to a multiple of `world_size` (so a few examples appear twice in an epoch, as
    with torch's DistributedSampler); with `drop_last` it is cut down to that multiple, and the
    last partial batch of each rank is dropped. Either way all ranks run the same number of
    batches, so collective ops never wait on a rank that has finished.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: str = "none",
        flip: bool | None = None,
        mean: Sequence[float] | torch.Tensor = (0.0,),
        std: Sequence[float] | torch.Tensor | None = (1.0,),
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        num_classes: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ReslabError(f"rank must be in [0, {world_size}), got {rank}")
        if (mixup > 0 or cutmix > 0) and not num_classes:
            raise ReslabError("mixup and cutmix make soft targets: give the loader num_classes")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.policy_name = augment
        self.policy = get_policy(augment, flip)
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dtype = dtype
        self.erasing, self.mixup, self.cutmix, self.num_classes = erasing, mixup, cutmix, num_classes
        self.epoch = 0
        scale, shift = normalization(mean, std, split.images.shape[1])
        self._scale, self._shift = scale.to(self.device), shift.to(self.device)

    @property
    def samples_per_rank(self) -> int:
        n = len(self.split)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        per_rank = self.samples_per_rank
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """The current epoch's order of the examples, every rank's, before padding and sharding
        (reslab.data.balance.BalancedBatchLoader draws it instead)."""
        if self.shuffle:
            return torch.randperm(len(self.split), generator=_generator(self.seed, self.epoch, _ORDER))
        return torch.arange(len(self.split))

    def indices(self) -> torch.Tensor:
        """This rank's example indices for the current epoch, in order."""
        n = len(self.split)
        order = self.order()
        total = self.samples_per_rank * self.world_size
        if total > n:  # pad by wrapping around (repeat if there are fewer examples than ranks)
            order = order.repeat(math.ceil(total / max(n, 1)))
        order = order[:total]
        mine = order[self.rank :: self.world_size]
        if self.drop_last:
            mine = mine[: len(self) * self.batch_size]
        return mine

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The rank is mixed in so ranks augment differently; the order stream ignores it.
        generator = _generator(self.seed, self.epoch, _AUGMENT, self.rank)
        mine = self.indices()
        for start in range(0, len(mine), self.batch_size):
            index = mine[start : start + self.batch_size]
            images = self.split.images[index].to(self.device, non_blocking=True)
            labels = self.split.labels[index].to(self.device, non_blocking=True)
            x = self.transform(images, generator)
            if self.mixup > 0 or self.cutmix > 0:
                x, labels = mix(x, labels, self.num_classes, mixup=self.mixup, cutmix=self.cutmix,
                                generator=generator)
            yield x, labels

    def transform(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 batch -> augmented, normalized batch in the loader's dtype and memory format."""
        x = apply_policy(images, self.policy, generator)
        x = torch.addcmul(self._shift, x, self._scale)
        if self.erasing > 0:
            x = erase(x, self.erasing, generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)
