"""Throughput of training and inference, measured the same way for reslab's paths and its peers.

    result = run_bench(BenchConfig(model="resnet50", mode="infer", batch_size=32))
    rows = compare(BenchConfig(model="resnet20", mode="train"))   # reslab against the textbook loop

A measurement is a few warm-up steps (allocator, oneDNN primitive caches, compilation), then as
many steps as fit in a timed window. Training is timed end to end: the in-memory uint8 data
pipeline (reslab.data.BatchLoader, augmentation on) feeding the trainer's own step function
(reslab.train.steps.make_step). Inference times the backend's forward pass on one normalized float
batch, the same tensor for every peer.

GFLOP/s are counted from the model's MACs (reslab.models.complexity): 2 FLOPs per MAC for a
forward pass, and 3 forward passes' worth for a training step (the backward pass costs about
twice the forward: gradients for both the inputs and the weights); for int8 they are integer
operations. Each row also gets the machine's measured peak at its precision on the same threads
(a large matrix product: the faster of torch's and ONNX Runtime's for fp32, torch's for bf16, ONNX
Runtime's u8 x s8 MatMulInteger for int8) and the fraction of it the model achieved.

`--compare` knows the hardware: the textbook loop and every installed backend in fp32 always, the
bf16 rows where the CPU multiplies bf16 natively, the int8 rows where it has int8 dot products
(AVX2 and later, ARM).
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.hardware import train_channels_last

MODES = ("train", "infer")
TRAIN_FLOPS_FACTOR = 3  # forward + backward, see the module docstring
DEFAULT_BATCH = {"train": 128, "infer": 32}
# int8 rows are calibrated on this many real images (the embedded digits, scaled to the input): the
# net is untrained, so only the kernels matter here; accuracy is benchmarks/bench_int8.py's business.
BENCH_CALIBRATION_IMAGES = 16
PEAK_SIZE = 2048  # the square matrix product whose rate is a row's peak


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
    plain_openvino: bool = False  # the peer an OpenVINO user compiles (plain_openvino_step); inference only

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
        if cfg.plain_openvino:
            if cfg.mode != "infer" or cfg.precision == "int8":
                raise ReslabError("the plain OpenVINO peer is an fp32 or bf16 inference row")
            cfg.backend, cfg.compile, cfg.channels_last = resolve_backend("openvino", device), False, None
        if cfg.precision == "int8":
            if cfg.mode == "train":
                raise ReslabError("int8 is an inference precision; train with --precision fp32, bf16 or auto")
            cfg.backend = resolve_backend(cfg.backend, device, "int8")
            return cfg
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
    if cfg.plain_openvino:
        return plain_openvino_step(cfg, model, x)
    from reslab.inference.predictor import Predictor

    calibration = _calibration_images(cfg) if cfg.precision == "int8" else None
    predictor = Predictor.from_model(model, _meta(cfg), cfg.device, backend=cfg.backend, precision=cfg.precision,
                                     compile=cfg.compile, channels_last=cfg.channels_last, calibration=calibration)
    runner = predictor.runner
    x = x.to(device) if cfg.backend == "torch" else x
    settings = {"bn_folded": True, "channels_last": getattr(runner, "channels_last", None)}
    if cfg.backend == "openvino":  # what OpenVINO was compiled with for this batch size
        compiled, requests = runner.compiled(len(x))
        settings.update(openvino_hint=str(compiled.get_property("PERFORMANCE_HINT")), openvino_requests=len(requests),
                        openvino_streams=int(compiled.get_property("NUM_STREAMS")))
    if hasattr(runner, "inference_precision") and cfg.precision != "int8":  # what OpenVINO really runs
        settings["openvino_inference_precision"] = runner.inference_precision
    if cfg.precision == "int8":
        from reslab.inference.quantize import Int8Settings

        settings["quantization"] = {**Int8Settings.for_this_cpu().to_dict(), "calibration_images": len(calibration),
                                    "calibration_data": "digits"}
    return (lambda: runner(x)), settings


def plain_openvino_step(cfg: BenchConfig, model: nn.Module, x: torch.Tensor) -> tuple[Callable[[], object], dict]:
    """What a user of OpenVINO types for this network, after OpenVINO's own guides: `ov.convert_model`
    of the PyTorch module (BatchNorm unfolded; OpenVINO fuses it itself) with an example input, compiled
    for the CPU with the LATENCY hint for one image and the THROUGHPUT hint for a batch, the row's
    INFERENCE_PRECISION_HINT (f32 stated, since OpenVINO's CPU default is bf16 where the CPU has it)
    and the bench's threads. A batch is submitted as OpenVINO's throughput guide does it: an
    AsyncInferQueue of the compiled model's optimal number of requests, one slice of the batch each
    (one synchronous call on a THROUGHPUT compile would run on one stream only)."""
    import numpy as np
    import openvino as ov

    threads = cfg.threads or torch.get_num_threads()
    hint = "LATENCY" if cfg.batch_size == 1 else "THROUGHPUT"
    with warnings.catch_warnings():  # the PyTorch frontend traces with torch.jit, whose deprecation is noise here
        warnings.simplefilter("ignore")
        converted = ov.convert_model(model.cpu().float().eval(), example_input=x[:1])
    compiled = ov.Core().compile_model(converted, "CPU", {
        "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "bf16" if cfg.precision == "bf16" else "f32"})
    array = x.numpy()
    jobs = min(int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")), len(array))
    if jobs == 1:
        def step():
            return compiled(array)[0]
    else:
        queue = ov.AsyncInferQueue(compiled, jobs)
        bounds = np.linspace(0, len(array), jobs + 1).round().astype(int)
        outputs = [None] * jobs
        queue.set_callback(lambda request, i: outputs.__setitem__(i, request.get_output_tensor(0).data.copy()))

        def step():
            for i in range(jobs):
                queue.start_async({0: array[bounds[i]:bounds[i + 1]]}, i)
            queue.wait_all()
            return np.concatenate(outputs)

    from reslab.inference.backends import compiled_precision

    return step, {"bn_folded": False, "channels_last": None, "openvino_hint": hint, "openvino_requests": jobs,
                  "openvino_streams": int(compiled.get_property("NUM_STREAMS")),
                  "openvino_inference_precision": compiled_precision(compiled)}


def _calibration_images(cfg: BenchConfig) -> torch.Tensor:
    """Real images for an int8 row's calibration: the embedded digits at the bench's input size, as RGB."""
    from reslab.data import load_data
    from reslab.inference.quantize import pick

    bundle = load_data("digits", image_size=cfg.image_size, quiet=True)
    return pick(bundle.train.images, BENCH_CALIBRATION_IMAGES).expand(-1, 3, -1, -1).contiguous()


# The best peak measured so far in this process, per (precision, threads): on a shared machine one
# measurement can land in another job's burst, and the peak is what the hardware does at best.
_PEAKS: dict[tuple[str, int], float] = {}


def peak_gflops(precision: str, threads: int, size: int = PEAK_SIZE) -> float | None:
    """GFLOP/s (int8: GOP/s) of a size x size x size matrix product at `precision` on `threads` CPU
    threads: what the hardware does at best, to read a model's rate against; measured at every call,
    the best so far returned. None where it cannot be measured (int8 without ONNX Runtime)."""
    measured = _measure_peak(precision, threads, size)
    if measured is None:
        return None
    _PEAKS[precision, threads] = max(measured, _PEAKS.get((precision, threads), 0.0))
    return _PEAKS[precision, threads]


def _measure_peak(precision: str, threads: int, size: int) -> float | None:
    """The best rate of the matrix-product kernels at `precision`: torch's (MKL or oneDNN) and, for fp32
    and int8, ONNX Runtime's (MLAS; on some CPUs MKL's fp32 product is the slower of the two)."""
    from reslab.hardware import bf16_is_fast

    if precision == "bf16" and not bf16_is_fast("cpu"):
        size = min(size, 512)  # emulated bf16 runs a 2048 product for minutes; its rate is low at any size
    steps = [] if precision == "int8" else [_torch_matmul(precision, size)]
    if precision in ("fp32", "int8"):
        steps.append(_ort_matmul(precision, size, threads))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = [2 * size**3 / min(time_steps(step, warmup=1, seconds=0.3, sync=lambda: None)) / 1e9
                 for step in steps if step is not None]
    finally:
        torch.set_num_threads(previous)
    return max(rates, default=None)


def _torch_matmul(precision: str, size: int) -> Callable[[], object]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return lambda: a @ b


_ORT_SESSIONS: dict[tuple[str, int, int], Callable[[], object]] = {}


def _ort_matmul(precision: str, size: int, threads: int) -> Callable[[], object] | None:
    """ONNX Runtime's fp32 MatMul or u8 x s8 MatMulInteger (the kernel its int8 convolutions run on);
    None without ONNX Runtime."""
    from reslab.inference.backends import installed_backends

    if "onnxruntime" not in installed_backends():
        return None
    key = (precision, size, threads)
    if key not in _ORT_SESSIONS:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        if precision == "int8":
            op, a_type, y_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
            a = rng.integers(0, 256, (size, size), dtype=np.uint8)
            b = rng.integers(-128, 128, (size, size), dtype=np.int8)
        else:
            op, a_type, y_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
            a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
        graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["Y"])], "peak",
                                  [helper.make_tensor_value_info("A", a_type, [size, size])],
                                  [helper.make_tensor_value_info("Y", y_type, [size, size])],
                                  [numpy_helper.from_array(b, "B")])
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        _ORT_SESSIONS[key] = lambda: session.run(None, {"A": a})
    return _ORT_SESSIONS[key]


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
    from reslab.train.steps import build_optimizer, make_step

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
    # A previous row's runtime (an ONNX Runtime session whose threads spin between runs) can outlive it in
    # a reference cycle and steal this row's cores: collected first, so each row runs alone.
    gc.collect()
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
    gflops_per_second = images_per_second * flops_per_image / 1e9
    # The peak at the precision that really ran (OpenVINO runs f32 on a CPU without bf16 whatever was asked).
    ran = {"f32": "fp32", "bf16": "bf16"}.get(settings.get("openvino_inference_precision"), cfg.precision)
    peak = peak_gflops(ran, cfg.threads or previous_threads) if cfg.torch_device.type == "cpu" else None
    return {
        "name": label(cfg),
        "model": cfg.model,
        "mode": cfg.mode,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "precision": cfg.precision,
        "backend": "openvino-plain" if cfg.plain_openvino else cfg.backend,
        "images_per_second": images_per_second,
        "ms_per_batch": 1000 * total / len(times),
        "ms_per_batch_median": 1000 * sorted(times)[len(times) // 2],
        "gflops_per_second": gflops_per_second,
        "peak_gflops_per_second": peak,
        "peak_precision": ran,
        "peak_fraction": gflops_per_second / peak if peak else None,
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
    if cfg.plain_openvino:
        return f"openvino-plain {cfg.precision}"
    name = f"reslab {cfg.backend} {cfg.precision}"
    return name + " compiled" if cfg.compile else name


def peers(config: BenchConfig) -> list[BenchConfig]:
    """What `--compare` runs: the textbook loop first (the ratios' base), then reslab's path as asked,
    then (inference) every installed backend in fp32, in bf16 where the hardware multiplies it natively,
    the exported runtimes in int8 where the CPU has int8 dot products, and OpenVINO's plain compile
    (plain_openvino_step) at each of its fp32 and bf16 precisions."""
    from reslab.hardware import bf16_is_fast
    from reslab.inference.backends import INT8_PREFERENCE, installed_backends
    from reslab.inference.quantize import int8_is_fast

    rows = [dataclasses.replace(config, textbook=True), config]
    if config.mode == "infer":
        device = config.torch_device
        installed = installed_backends()
        wanted = [(backend, "fp32") for backend in installed]
        if bf16_is_fast(device):
            wanted += [(backend, "bf16") for backend in ("torch", "openvino") if backend in installed]
        if device.type == "cpu" and int8_is_fast():
            wanted += [(backend, "int8") for backend in INT8_PREFERENCE if backend in installed]
        if "openvino" in installed:
            wanted += [("plain", precision) for backend, precision in wanted
                       if backend == "openvino" and precision != "int8"]
        for backend, precision in wanted:
            plain = backend == "plain"
            peer = dataclasses.replace(config, backend="openvino" if plain else backend, precision=precision,
                                       compile=False, plain_openvino=plain)
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
