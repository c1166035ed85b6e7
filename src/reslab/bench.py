"""Throughput of training and inference, measured the same way for reslab's paths and its peers.

    result = run_bench(BenchConfig(model="resnet50", mode="infer", batch_size=32))
    rows = compare(BenchConfig(model="resnet20", mode="train"))   # reslab against the textbook loop

A measurement is a few warm-up steps (allocator, oneDNN primitive caches, compilation), then as
many steps as fit in a timed window. Training is timed end to end: the in-memory uint8 data
pipeline (reslab.data.BatchLoader, augmentation on) feeding the trainer's own step function
(reslab.train.loop.make_step). Inference times the backend's forward pass on one normalized float
batch, the same tensor for every peer.

GFLOP/s are counted from the model's MACs (reslab.models.complexity): 2 FLOPs per MAC for a
forward pass, and 3 forward passes' worth for a training step (the backward pass costs about
twice the forward: gradients for both the inputs and the weights).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.hardware import train_channels_last

MODES = ("train", "infer")
TRAIN_FLOPS_FACTOR = 3  # forward + backward, see the module docstring
DEFAULT_BATCH = {"train": 128, "infer": 32}


@dataclass
class BenchConfig:
    model: str = "resnet20"  # cheap enough to train-bench in seconds on 2 cores
    mode: str = "train"
    batch_size: int | None = None  # None: 128 for train, 32 for infer
    image_size: int | None = None  # None: the family's native input (32 CIFAR, 224 ImageNet)
    precision: str = "auto"
    backend: str = "auto"  # inference only; training is always torch
    compile: bool = False
    channels_last: bool | None = None  # None: as reslab train / Predictor decide for this hardware
    warmup: int = 3  # steps before the timed window
    seconds: float = 5.0  # length of the timed window
    threads: int | None = None  # torch intra-op threads (and the exported runtimes'); None: torch's default
    num_classes: int | None = None  # None: the model's default (10 for 32 px nets, 1000 for ImageNet ones)
    device: str = "cpu"
    textbook: bool = False  # the peer every repository runs: fp32, NCHW, eager, no folding, per-step syncs

    def resolve(self) -> BenchConfig:
        from reslab.hardware import resolve_precision
        from reslab.inference.backends import resolve_backend
        from reslab.models import get_model_spec

        cfg = dataclasses.replace(self)
        if cfg.mode not in MODES:
            raise ReslabError(f"--mode must be train or infer, got {cfg.mode!r}")
        spec = get_model_spec(cfg.model)
        if cfg.batch_size is None:
            cfg.batch_size = DEFAULT_BATCH[cfg.mode]
        if cfg.image_size is None:
            cfg.image_size = spec.image_size
        if cfg.num_classes is None:
            cfg.num_classes = spec.num_classes
        for name in ("batch_size", "image_size", "warmup"):
            value = getattr(cfg, name)
            if value < (0 if name == "warmup" else 1):
                raise ReslabError(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}, "
                                  f"got {value}")
        if cfg.mode == "train" and cfg.batch_size < 2:
            raise ReslabError(f"training needs --batch-size of at least 2 (BatchNorm), got {cfg.batch_size}")
        if not cfg.seconds > 0:
            raise ReslabError(f"--seconds must be positive, got {cfg.seconds}")
        if cfg.threads is not None and cfg.threads < 1:
            raise ReslabError(f"--threads must be at least 1, got {cfg.threads}")
        if cfg.textbook:
            cfg.precision, cfg.backend, cfg.compile, cfg.channels_last = "fp32", "torch", False, False
        device = cfg.torch_device
        cfg.precision = resolve_precision(cfg.precision, device)
        if cfg.mode == "train":
            if cfg.backend not in ("auto", "torch"):
                raise ReslabError(f"training runs on torch only; --backend {cfg.backend} is for --mode infer")
            cfg.backend = "torch"
        else:
            cfg.backend = resolve_backend(cfg.backend, device)
        return cfg

    @property
    def torch_device(self) -> torch.device:
        from reslab.hardware import check_device

        return check_device(self.device)


def time_steps(step: Callable[[], object], warmup: int, seconds: float, sync: Callable[[], None]) -> list[float]:
    """Seconds per call of `step`, after `warmup` calls, over a window of about `seconds` (3 calls at least)."""
    for _ in range(warmup):
        step()
    sync()
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds and len(times) >= 3:
            return times


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _model(cfg: BenchConfig) -> nn.Module:
    from reslab.models import create_model

    torch.manual_seed(0)  # same weights every run: exported graphs are cached by their weights
    return create_model(cfg.model, num_classes=cfg.num_classes)


def _meta(cfg: BenchConfig):
    from reslab.checkpoint import CheckpointMeta

    return CheckpointMeta(model=cfg.model, classes=[str(i) for i in range(cfg.num_classes)],
                          preprocessing={"image_size": cfg.image_size, "in_channels": 3, "mean": [0.0],
                                         "std": [1.0], "resize": "squash", "interpolation": "bilinear"})


def infer_step(cfg: BenchConfig, model: nn.Module, x: torch.Tensor) -> tuple[Callable[[], object], dict]:
    """The forward pass to time and what it actually ran with (backend, layout, precision)."""
    device = cfg.torch_device
    if cfg.textbook:
        model = model.to(device).eval()
        x = x.to(device)

        def textbook():
            with torch.no_grad():
                return model(x)

        return textbook, {"channels_last": False, "bn_folded": False}
    from reslab.inference.predictor import Predictor

    predictor = Predictor.from_model(model, _meta(cfg), cfg.device, backend=cfg.backend, precision=cfg.precision,
                                     compile=cfg.compile, channels_last=cfg.channels_last)
    runner = predictor.runner
    x = x.to(device) if cfg.backend == "torch" else x
    settings = {"bn_folded": True, "channels_last": getattr(runner, "channels_last", None)}
    if hasattr(runner, "inference_precision"):  # what OpenVINO really runs, whatever was asked
        settings["openvino_inference_precision"] = runner.inference_precision
    return (lambda: runner(x)), settings


def _synthetic_split(cfg: BenchConfig, batches: int = 4):
    from reslab.data import Split

    generator = torch.Generator().manual_seed(0)
    n = cfg.batch_size * batches
    images = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, cfg.num_classes, (n,), generator=generator))


def _augment_policy(cfg: BenchConfig) -> str:
    from reslab.models import get_model_spec

    return "cifar" if get_model_spec(cfg.model).family == "cifar" else "folder"


def train_step(cfg: BenchConfig, model: nn.Module) -> tuple[Callable[[], object], dict]:
    """reslab's training step fed by its loader, cycling over a few batches of synthetic uint8 images."""
    from reslab.data import BatchLoader
    from reslab.train.config import TrainConfig
    from reslab.train.loop import build_optimizer, make_step

    device = cfg.torch_device
    if cfg.textbook:
        return textbook_train_step(cfg, model)
    channels_last = cfg.channels_last if cfg.channels_last is not None else train_channels_last(
        cfg.precision, device)  # as reslab train decides
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_cfg = TrainConfig(model=cfg.model, batch_size=cfg.batch_size, epochs=1).resolve()
    optimizer = build_optimizer(model, train_cfg)
    forward = torch.compile(model) if cfg.compile else model
    step = make_step(forward, optimizer, precision=cfg.precision, grad_clip=None,
                     loss_fn=nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing))
    loader = BatchLoader(_synthetic_split(cfg), cfg.batch_size, augment=_augment_policy(cfg), mean=(0.5,),
                         std=(0.25,), device=device, channels_last=channels_last, drop_last=True)
    batches = _cycle(loader)

    def run():
        x, y = next(batches)
        return step(x, y)

    return run, {"channels_last": channels_last, "optimizer": train_cfg.optimizer,
                 "augment": loader.policy_name, "data": "BatchLoader, synthetic uint8"}


def textbook_train_step(cfg: BenchConfig, model: nn.Module) -> tuple[Callable[[], object], dict]:
    """The loop of the well-known CIFAR ResNet repositories: a DataLoader with per-image crop and
    flip, fp32 NCHW eager, SGD, and `loss.item()` / accuracy `.item()` every step."""
    from torch.utils.data import DataLoader, TensorDataset

    device = cfg.torch_device
    split = _synthetic_split(cfg)
    pad = 4 if _augment_policy(cfg) == "cifar" else 0
    size = cfg.image_size
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)

    def collate(samples):
        images = []
        for image, _ in samples:  # per image, as torchvision's RandomCrop/RandomHorizontalFlip/Normalize
            padded = nn.functional.pad(image, (pad,) * 4)
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = padded[:, top : top + size, left : left + size]
            if torch.rand(()) < 0.5:
                image = image.flip(2)
            images.append((image.float() / 255 - mean) / std)
        return torch.stack(images), torch.stack([label for _, label in samples])

    loader = DataLoader(TensorDataset(split.images, split.labels), batch_size=cfg.batch_size, shuffle=True,
                        collate_fn=collate, drop_last=True)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    batches = _cycle(loader)

    def run():
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        output = model(x)
        loss = criterion(output, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item(), (output.argmax(1) == y).float().mean().item()

    return run, {"channels_last": False, "optimizer": "sgd", "augment": "per-image crop+flip",
                 "data": "DataLoader, synthetic uint8"}


def _cycle(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_bench(config: BenchConfig) -> dict:
    """One measurement: the JSON object of `reslab bench --json`."""
    from reslab.hardware import describe
    from reslab.models.summary import complexity

    cfg = config.resolve()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model = _model(cfg)
        macs = complexity(model, (3, cfg.image_size, cfg.image_size))["macs"]
        if cfg.mode == "infer":
            x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size,
                            generator=torch.Generator().manual_seed(0))
            step, settings = infer_step(cfg, model, x)
        else:
            step, settings = train_step(cfg, model)
        start = time.perf_counter()
        times = time_steps(step, cfg.warmup, cfg.seconds, _sync(cfg.torch_device))
        total = sum(times)
        warmup_seconds = time.perf_counter() - start - total
    finally:
        torch.set_num_threads(previous_threads)
    flops_per_image = 2 * macs * (TRAIN_FLOPS_FACTOR if cfg.mode == "train" else 1)
    images_per_second = cfg.batch_size * len(times) / total
    return {
        "name": label(cfg),
        "model": cfg.model,
        "mode": cfg.mode,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "precision": cfg.precision,
        "backend": cfg.backend,
        "images_per_second": images_per_second,
        "ms_per_batch": 1000 * total / len(times),
        "ms_per_batch_median": 1000 * sorted(times)[len(times) // 2],
        "gflops_per_second": images_per_second * flops_per_image / 1e9,
        "flops_per_image": flops_per_image,
        "steps": len(times),
        "seconds": total,
        "warmup_seconds": warmup_seconds,
        "compile": cfg.compile,
        "textbook": cfg.textbook,
        **settings,
        "threads": cfg.threads or previous_threads,
        "device": cfg.device,
        "hardware": describe(),
    }


def label(cfg: BenchConfig) -> str:
    if cfg.textbook:
        return "textbook torch fp32 NCHW eager"
    name = f"reslab {cfg.backend} {cfg.precision}"
    return name + " compiled" if cfg.compile else name


def peers(config: BenchConfig) -> list[BenchConfig]:
    """What `--compare` runs: the textbook loop first (the ratios' base), then reslab's path as asked,
    then (inference) every installed exported runtime in fp32 and OpenVINO at the hardware's precision."""
    from reslab.inference.backends import installed_backends

    rows = [dataclasses.replace(config, textbook=True), config]
    if config.mode == "infer":
        asked = config.resolve()
        for backend in installed_backends():
            for precision in ("fp32", asked.precision) if backend == "openvino" else ("fp32",):
                peer = dataclasses.replace(config, backend=backend, precision=precision, compile=False)
                if peer.resolve() not in [r.resolve() for r in rows]:
                    rows.append(peer)
    return rows


def compare(config: BenchConfig, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """The peers of `config` measured one after another in this process on the same input; each row gets
    `ratio`, its images/s over the textbook row's."""
    results = []
    for peer in peers(config):
        result = run_bench(peer)
        result["ratio"] = result["images_per_second"] / results[0]["images_per_second"] if results else 1.0
        results.append(result)
        if on_result:
            on_result(result)
    return results
