"""Digits, batched augmentation and the BatchLoader (seeding, resumption, DDP shards)."""

from __future__ import annotations

import pytest
import torch

from reslab.data import POLICIES, BatchLoader, Split, load_data
from reslab.data.augment import Policy, augment
from reslab.data.bundle import channel_stats, stratified_split
from reslab.errors import ReslabError


def label_coded_split(n=40, size=16, channels=3):
    """Each image is one flat grey level that encodes its label, so alignment is checkable."""
    labels = torch.arange(n) % 10
    images = (labels * 20 + 10).to(torch.uint8)[:, None, None, None].expand(n, channels, size, size)
    return Split(images.contiguous(), labels)


def test_digits_default_split():
    bundle = load_data("digits")
    assert bundle.classes == [str(d) for d in range(10)]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1259, 179, 359)  # 70/10/20
    assert bundle.train.images.shape[1:] == (1, 8, 8) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.images.max() == 255  # 16 grey levels scaled to 0..255
    assert set(bundle.test.labels.tolist()) == set(range(10))
    prep = bundle.preprocessing()
    assert prep["image_size"] == 8 and prep["in_channels"] == 1 and len(prep["mean"]) == 1
    upscaled = load_data("digits", image_size=32)
    assert upscaled.train.images.shape[1:] == (1, 32, 32)
    assert upscaled.train.labels.equal(bundle.train.labels)


def test_digits_split_depends_on_seed_only():
    a, b, c = load_data("digits", seed=5), load_data("digits", seed=5), load_data("digits", seed=6)
    assert a.test.images.equal(b.test.images) and a.train.labels.equal(b.train.labels)
    assert not a.test.images.equal(c.test.images)


def test_bad_arguments_are_user_errors():
    with pytest.raises(ReslabError, match="val-split"):
        load_data("digits", val_split=1.5)
    with pytest.raises(ReslabError, match="data not found: 'no-such-data'"):
        load_data("no-such-data")
    with pytest.raises(ReslabError, match="unknown augmentation 'wild'"):
        BatchLoader(label_coded_split(), 4, augment="wild")


def test_stratified_split_keeps_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20).numpy()
    train, held = stratified_split(labels, 0.1, seed=0)
    assert sorted(labels[held].tolist()) == [0] * 5 + [1] * 3 + [2] * 2
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == 100


def test_channel_stats_match_torch():
    images = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(images)
    as_float = images.float().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(torch.tensor(mean), as_float.mean(1), atol=1e-6)
    assert torch.allclose(torch.tensor(std), as_float.std(1, unbiased=False), atol=1e-5)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_augmentation_keeps_shape_dtype_and_labels(policy):
    split = label_coded_split()
    loader = BatchLoader(split, 16, augment=policy, seed=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    seen = 0
    for x, y in loader:
        assert x.shape == (len(y), 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        # The centre pixel comes from the image itself under every geometric policy (crops move at
        # most 4 px; grid_sample of a flat image with reflection padding stays flat); TrivialAugment's
        # colour operations change it (tests/test_recipe.py checks those).
        expected = ((y * 20 + 10).float() / 255 - 0.5) / 0.25
        if not POLICIES[policy].trivial:
            assert torch.allclose(x[:, :, 8, 8], expected[:, None].expand(-1, 3), atol=1e-4)
        seen += len(y)
    assert seen == len(split)


def test_cifar_crop_and_flip_move_pixels():
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :, 4:] = 200  # right half bright
    generator = torch.Generator().manual_seed(0)
    out = augment(images, POLICIES["cifar"], generator)
    assert out.dtype == torch.float32 and out.shape == images.shape
    left_bright = (out[:, 0, 4, 1] > 100).sum().item()
    assert 10 < left_bright < 54  # about half flipped
    shifted_down = (out[:, 0, 0, :] == 0).all(1) & (out[:, 0, 7, :] != 0).any(1)
    assert shifted_down.any()  # zero padding entered some crops


def test_affine_policy_changes_content_but_not_a_flat_image():
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=rng)
    out = augment(images, POLICIES["folder"], torch.Generator().manual_seed(1))
    assert out.shape == images.shape and not torch.equal(out, images.float())
    flat = torch.full((4, 3, 32, 32), 90, dtype=torch.uint8)
    assert torch.allclose(augment(flat, Policy(rotation=0.1, zoom=0.1), rng), flat.float(), atol=1e-3)


def test_set_epoch_makes_batches_a_pure_function_of_seed_and_epoch():
    split = Split(torch.randint(0, 256, (50, 3, 12, 12), dtype=torch.uint8), torch.arange(50) % 5)

    def batches(loader, epoch):
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in loader]

    common = dict(augment="folder", seed=7, mean=(0.4,) * 3, std=(0.2,) * 3)
    a = BatchLoader(split, 8, **common)
    run = [batches(a, e) for e in range(3)]
    resumed = batches(BatchLoader(split, 8, **common), 2)  # a fresh loader, as after --resume
    assert len(run[2]) == len(resumed) == len(a) == 7
    for (xa, ya), (xb, yb) in zip(run[2], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(run[0][0][1], run[1][0][1])  # another epoch, another order
    again = batches(a, 2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(run[2], again))


def test_unshuffled_order_and_drop_last():
    split = label_coded_split(n=10)
    loader = BatchLoader(split, 4, shuffle=False)
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(BatchLoader(split, 4, shuffle=False, drop_last=True)) == 2


@pytest.mark.parametrize("n, world", [(12, 3), (10, 3), (5, 4)])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(n, world):
    split = label_coded_split(n=n)
    loaders = [BatchLoader(split, 2, seed=3, rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(4)
    shards = [loader.indices().tolist() for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1  # every rank runs the same number of batches
    assert len({len(s) for s in shards}) == 1
    flat = sum(shards, [])
    assert set(flat) == set(range(n))  # covering
    assert len(flat) - len(set(flat)) == (-n) % world  # only the padding repeats
    dropped = [BatchLoader(split, 2, seed=3, rank=r, world_size=world, drop_last=True) for r in range(world)]
    flat_dropped = sum((d.indices().tolist() for d in dropped), [])
    assert len(flat_dropped) == len(set(flat_dropped))  # disjoint
    assert len({len(d) for d in dropped}) == 1


def test_output_dtype_layout_and_pixel_mean():
    split = label_coded_split(n=8)
    loader = BatchLoader(split, 8, shuffle=False, channels_last=True, dtype=torch.bfloat16,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    x, _ = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    pixel_mean = split.pixel_mean()
    assert pixel_mean.shape == (3, 16, 16)
    x, _ = next(iter(BatchLoader(split, 8, shuffle=False, mean=pixel_mean, std=None)))
    assert torch.allclose(x.mean(0), torch.zeros(3, 16, 16), atol=1e-6)  # per-pixel mean removed


def test_sampling_grid_equals_affine_grid():
    from reslab.data.augment import affine_matrices, sampling_grid

    theta = affine_matrices(5, POLICIES["folder"], torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 3, 12, 20], align_corners=False)
    assert torch.allclose(sampling_grid(theta, 12, 20), expected, atol=1e-6)
