"""The training configuration: one typed dataclass, filled by the CLI, resolved by a recipe, saved.

Fields left `None` are filled by the recipe (`resolve()`); the resolved config is what config.json
holds, so a run can be rebuilt from it.

Recipe defaults (a field given explicitly always wins):

| field           | `paper` (section 4.2)            | `fast` (default)                         |
| --------------- | -------------------------------- | ---------------------------------------- |
| optimizer       | sgd, momentum 0.9                | sgd, momentum 0.9, Nesterov              |
| lr              | 0.1 (adam/adamw: 1e-3)           | 0.2 (adam/adamw: 3e-3)                   |
| weight_decay    | 1e-4 on every parameter          | 5e-4 (adamw: 0.05), none on norms/biases |
| batch_size      | 128                              | 64 (more BN updates on small data)       |
| schedule        | step: lr/10 at 50% and 75%       | onecycle: linear up for 25%, then down   |
| label_smoothing | 0                                | 0.1                                      |
| epochs          | 182 (64k iterations, 45k images) | 6                                        |

The paper divides the lr by 10 at 32k and 48k of 64k iterations: 50% and 75% of training.

A photo folder trained from scratch with the fast recipe takes its own defaults where options are
left out: the model, input size, epochs, SGD learning rate and ingredients (augmentation policy,
random erasing, mixup, cutmix, EMA) of `reslab.data.folder.PHOTO_DEFAULTS`, chosen by measurement
(benchmarks/RESULTS.md, "Small photo folders"); small images (40 px or less) take resnet20 at 32 px,
and small gray ones also the recipe's lr, no augmentation and no training mirror ("Small images:
defaults measured"); under --budget small colour ones take myrtle_resnet9_quarter ("CIFAR-10 in 30
minutes: the net"). An explicit --model drops only the model's stem and input size from them.
The CIFAR data sets (cifar10, cifar100, a CIFAR archive) take that budget choice for small colour
folders (the net, lr 0.05, flip and 4-pixel crop) under --budget; other data (digits, and CIFAR
for a fixed number of epochs) keep resnet20 and every ingredient off.

`budget` (seconds) leaves `epochs` open: the trainer measures this machine's step and evaluation
times, then fixes the epochs that fit (`with_epochs`); config.json records the epochs so chosen.

`lr_find` leaves `lr` to the learning-rate range test (reslab.train.lr_find), run before the first
step: `lr` becomes its suggestion (every parameter group scaled with it) and config.json records
how it was found under "lr_find"; a resumed run keeps that lr and does not test again.

`finetune` (for `--pretrained` runs; fastai's `fine_tune` shape, Howard and Ruder 2018): the new
head alone for `head_epochs` with the body frozen (BatchNorm in eval), at lr * head_lr_mult on a
cosine; then every layer, one-cycle, the last stage at lr and each earlier part (stage, stem) at
`layer_decay` times the next one's (discriminative learning rates). Its defaults were chosen by
measurement: benchmarks/RESULTS.md, "Fine-tuning".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from reslab.errors import ReslabError
from reslab.hardware import PRECISIONS, check_device, check_memory, default_device

RECIPES = ("paper", "fast", "finetune")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "onecycle", "cosine", "constant")
# torch.manual_seed takes 64 bits and numpy's SeedSequence no negatives; a signed int64 suits both
# and any tensor that stores it.
SEED_LIMIT = 2**63

# The finetune recipe's defaults (benchmarks/RESULTS.md, "Fine-tuning", measured on cats-vs-dogs-2000).
FINETUNE_EPOCHS, FINETUNE_HEAD_EPOCHS, FINETUNE_LR = 8, 1, 0.02
FINETUNE_LAYER_DECAY, FINETUNE_HEAD_LR_MULT = 0.5, 5.0

# Per recipe: the values that fill fields left None (lr and weight decay depend on the optimizer).
_RECIPE_DEFAULTS = {
    "paper": dict(optimizer="sgd", momentum=0.9, nesterov=False, batch_size=128, schedule="step",
                  label_smoothing=0.0, epochs=182, warmup_epochs=0.0),
    "fast": dict(optimizer="sgd", momentum=0.9, nesterov=True, batch_size=64, schedule="onecycle",
                 label_smoothing=0.1, epochs=6, head_epochs=0, layer_decay=1.0),
    "finetune": dict(optimizer="sgd", momentum=0.9, nesterov=True, batch_size=64, schedule="onecycle",
                     label_smoothing=0.1, epochs=FINETUNE_EPOCHS, head_epochs=FINETUNE_HEAD_EPOCHS,
                     layer_decay=FINETUNE_LAYER_DECAY, head_lr_mult=FINETUNE_HEAD_LR_MULT),
}
_LR = {"paper": {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}, "fast": {"sgd": 0.2, "adam": 3e-3, "adamw": 3e-3},
       "finetune": {"sgd": FINETUNE_LR, "adam": 3e-4, "adamw": 3e-4}}
_WEIGHT_DECAY = {"paper": {"sgd": 1e-4, "adam": 1e-4, "adamw": 1e-4},
                 "fast": {"sgd": 5e-4, "adam": 5e-4, "adamw": 0.05},
                 "finetune": {"sgd": 5e-4, "adam": 5e-4, "adamw": 0.05}}
# One-cycle spends this share of training warming up (torch's OneCycleLR defaults to 0.3; short
# runs such as the 6-epoch default want the annealing half longer); cosine warms up for one epoch.
ONECYCLE_WARMUP = 0.25


@dataclass
class TrainConfig:
    """Every option of a training run. `None` means "the recipe's default" until `resolve()`."""

    model: str | None = None  # None: resnet20, or the photo-folder default
    data: str = "digits"
    data_dir: str | None = None  # cache for downloads and decoded folders
    epochs: int | None = None
    budget: float | None = None  # seconds of wall clock that fix the epochs; excludes `epochs`
    batch_size: int | None = None
    lr: float | None = None
    # Run the lr range test first and train at its suggestion (reslab.train.lr_find); config.json then
    # holds the lr it chose as `lr`, and how as "lr_find". Only for a new run, with no explicit lr.
    lr_find: bool | str = False  # True: the default rule ("minimum"); or a rule's name (lr_find.RULES)
    optimizer: str | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    recipe: str = "fast"
    schedule: str | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    image_size: int | None = None  # None: the model family's native input (32 CIFAR, 224 ImageNet)
    seed: int = 0
    precision: str = "auto"
    channels_last: bool | None = None  # None: reslab.hardware.train_channels_last (CPU and CUDA)
    compile: bool = False
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    early_stop: int | None = None  # patience in epochs without a better val accuracy; None: off
    val_split: float | None = None  # None: the data's default
    augment: str | None = None  # None: the data's default policy
    flip: bool | None = None  # mirror training images; None: the policy's own (small gray folders: off)
    random_erasing: float | None = None  # probability of erasing a rectangle of each image; 0: off
    mixup: float | None = None  # Beta alpha of mixup; 0: off
    cutmix: float | None = None  # Beta alpha of cutmix; 0: off (with mixup too: one of them per batch)
    ema: float | None = None  # decay per step of an exponential moving average of the weights; 0: off
    shortcut: str | None = None  # CIFAR/ImageNet shortcut option A/B/C; None: the model's default
    stem: str | None = None  # ResNet stem (reslab.models.resnet.STEMS); None: the model's default
    out: str | None = None  # None: runs/<model>-<data>-<time>/
    resume: str | None = None
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    freeze: str | None = None
    head_lr_mult: float | None = None  # None: the recipe's (finetune 5, else 1)
    head_epochs: int | None = None  # epochs of the head alone, body frozen (finetune 1, else 0)
    layer_decay: float | None = None  # lr of each earlier part / the next one's (finetune 0.5, else 1)
    aux_logits: bool = False  # Inception nets' auxiliary classifiers, weighted into the loss
    quiet: bool = False
    log: str | None = None  # "tensorboard": event files in the run directory too (reslab.train.tensorboard)
    # Imbalanced data (reslab.data.balance): "balanced" weights the loss by inverse class frequency /
    # draws each epoch class-balanced; either picks the best weights by balanced accuracy. None: "none".
    class_weights: str | None = None
    sampler: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    no_decay_norm_bias: bool | None = None  # None: the recipe's (fast: True, paper: False)
    # Several processes (reslab.train.distributed, docs/distributed.md): batch_size is the global
    # batch unless scale_lr makes it per process (and the lr times the process count).
    nproc: int = 1  # processes spawned on this machine; under torchrun, torchrun decides
    sync_bn: bool = False  # BatchNorm statistics over the global batch
    scale_lr: bool = False
    dist_timeout: float | None = None  # seconds a collective may wait; None: $RESLAB_DIST_TIMEOUT or 600

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a dict (config.json's keys); unknown keys are refused, naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ReslabError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve(self) -> TrainConfig:
        """A copy with every recipe default filled in and every value checked. With a `budget` and
        no `epochs`, the epochs (and what depends on them) stay open for `with_epochs`."""
        if self.recipe not in RECIPES:
            raise ReslabError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.budget is not None and self.epochs is not None:
            raise ReslabError(f"--budget {format_duration(self.budget)} chooses the number of epochs itself, so "
                              f"--epochs {self.epochs} cannot come with it; drop one of them")
        from reslab.data import data_path

        cfg = dataclasses.replace(self, data=data_path(self.data))
        for key, value in photo_defaults(cfg).items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.model is None:
            cfg.model = "resnet20"
        for key in ("class_weights", "sampler"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, "none")
        for key in ("random_erasing", "mixup", "cutmix", "ema"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, 0.0)
        if cfg.optimizer not in (None, "sgd") and cfg.nesterov is None:
            cfg.nesterov = False  # Nesterov momentum is an SGD option
        for key, value in _RECIPE_DEFAULTS[cfg.recipe].items():
            if getattr(cfg, key) is None and not (key == "epochs" and cfg.budget is not None):
                setattr(cfg, key, value)
        if cfg.optimizer not in OPTIMIZERS:
            raise ReslabError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if cfg.lr is None:
            cfg.lr = _LR[cfg.recipe][cfg.optimizer]
        if cfg.weight_decay is None:
            cfg.weight_decay = _WEIGHT_DECAY[cfg.recipe][cfg.optimizer]
        if cfg.no_decay_norm_bias is None:
            cfg.no_decay_norm_bias = cfg.recipe != "paper"
        for key, value in (("head_lr_mult", 1.0), ("head_epochs", 0), ("layer_decay", 1.0)):
            if getattr(cfg, key) is None:  # the paper recipe: one lr for every layer
                setattr(cfg, key, value)
        if cfg.warmup_epochs is None and cfg.epochs is not None:
            cfg.warmup_epochs = cfg._default_warmup()
        cfg.check()
        return cfg

    def _default_warmup(self) -> float:
        # Of the epochs after the head epochs (the finetune recipe's).
        span = self.epochs - (self.head_epochs if isinstance(self.head_epochs, int) else 0)
        return ONECYCLE_WARMUP * span if self.schedule == "onecycle" else (1.0 if self.schedule == "cosine" else 0.0)

    def with_epochs(self, epochs: int) -> TrainConfig:
        """This resolved budget config with its epochs fixed (the warm-up follows unless it was given),
        and the budget itself dropped: what remains reruns the very same run (config.json)."""
        cfg = dataclasses.replace(self, epochs=epochs, budget=None)
        if self.warmup_epochs is None:
            cfg.warmup_epochs = cfg._default_warmup()
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse impossible values with the reason and the value received."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ReslabError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {value!r}")

        open_epochs = self.epochs is None and self.budget is not None  # fixed later by with_epochs
        if not open_epochs:
            positive_int("epochs")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not math.isfinite(self.budget) or self.budget <= 0):
            raise ReslabError(f"--budget must be a positive duration (e.g. 15m, 900s, 1h), got {self.budget!r}")
        positive_int("batch_size")
        positive_int("nproc")
        if self.dist_timeout is not None:
            from reslab.train.distributed import resolve_timeout

            resolve_timeout(self.dist_timeout)
        if self.image_size is not None:
            positive_int("image_size")
        if self.early_stop is not None:
            positive_int("early_stop")
        if self.schedule not in SCHEDULES:
            raise ReslabError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ReslabError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "head_lr_mult",
                     "layer_decay", "random_erasing", "mixup", "cutmix", "ema"):
            value = getattr(self, name)
            if value is None and name == "warmup_epochs" and open_epochs:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ReslabError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ReslabError(f"--lr must be positive, got {self.lr!r}")
        if self.momentum >= 1:
            raise ReslabError(f"--momentum must be below 1, got {self.momentum!r}")
        if self.label_smoothing >= 1:
            raise ReslabError(f"--label-smoothing must be below 1, got {self.label_smoothing!r}")
        if self.random_erasing > 1:
            raise ReslabError(f"--random-erasing is a probability in [0, 1], got {self.random_erasing!r}")
        if self.ema >= 1:
            raise ReslabError(f"--ema is the decay per step of the weights' average, in [0, 1) (e.g. 0.99; 0 is off), "
                              f"got {self.ema!r}")
        if self.flip is not None and not isinstance(self.flip, bool):
            raise ReslabError(f"--flip is on or off (true or false), got {self.flip!r}")
        if self.stem is not None:
            from reslab.models.resnet import STEMS

            if self.stem not in STEMS:
                raise ReslabError(f"--stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ReslabError(f"Nesterov momentum needs --optimizer sgd with momentum > 0 "
                              f"(got {self.optimizer}, momentum {self.momentum})")
        if not open_epochs and self.warmup_epochs > self.epochs:
            raise ReslabError(f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ReslabError(f"--grad-clip must be a positive number, got {self.grad_clip!r}")
        split = self.val_split
        if split is not None and (isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < 1):
            raise ReslabError(f"--val-split must be a fraction in [0, 1), got {self.val_split!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ReslabError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        device = check_device(self.device or default_device())
        if self.image_size is not None and device.type == "cpu":
            self._check_batch_fits()
        if self.early_stop is not None and self.val_split == 0:
            raise ReslabError("--early-stop watches the validation accuracy, but --val-split 0 leaves no "
                              "validation data; give --val-split > 0 or drop --early-stop")
        if self.recipe == "finetune" and self.pretrained is None:
            raise ReslabError("--recipe finetune fine-tunes pretrained weights; give --pretrained SRC (e.g. "
                              "--pretrained imagenet), or use --recipe fast to train from scratch")
        if isinstance(self.head_epochs, bool) or not isinstance(self.head_epochs, int) or not (
                0 <= self.head_epochs < (self.epochs if not open_epochs else math.inf)):
            raise ReslabError(f"--head-epochs must be an integer in [0, --epochs {self.epochs}), "
                              f"got {self.head_epochs!r}")
        if self.head_epochs and self.pretrained is None:
            raise ReslabError("--head-epochs trains a new head on pretrained weights; give --pretrained SRC too")
        if not (isinstance(self.layer_decay, (int, float)) and 0 < self.layer_decay <= 1):
            raise ReslabError(f"--layer-decay must be in (0, 1], got {self.layer_decay!r}")
        if self.freeze is not None and self.pretrained is None:
            raise ReslabError(f"--freeze {self.freeze} freezes pretrained layers; give --pretrained SRC too")
        if self.pretrained_sha256 is not None and self.pretrained is None:
            raise ReslabError("--pretrained-sha256 checks pretrained weights; give --pretrained SRC too")
        from reslab.train.tensorboard import check_log

        check_log(self.log)
        from reslab.data.balance import check_options

        check_options(self.class_weights, self.sampler)

    def _check_batch_fits(self) -> None:
        # A lower bound: the float input batch alone (3 channels at most), before any activation.
        per_image = 3 * self.image_size**2 * 4
        check_memory(
            self.batch_size * per_image,
            f"--image-size {self.image_size} with --batch-size {self.batch_size}: one float batch",
            lambda available: f"use --batch-size {available // 2 // per_image} or a smaller --image-size"
            if available // 2 >= per_image else
            f"use --image-size {math.isqrt(available // 2 // (12 * self.batch_size))} or less",
        )


def photo_defaults(cfg: TrainConfig) -> dict:
    """The photo-folder defaults (reslab.data.folder.photo_choice: PHOTO_DEFAULTS for this folder's
    image size and count, and under --budget a CIFAR data set's: folder.cifar_budget_choice) that
    apply to `cfg`: a folder trained from scratch with the fast recipe;
    the model's stem and input size only with the model. An explicit --model keeps the rest (epochs,
    lr, augmentation, mirror, ingredients): they are the folder's, measured (folder.PHOTO_MODEL_CHOICE)."""
    return data_choice(cfg)[0]


def data_choice(cfg: TrainConfig) -> tuple[dict, str, str]:
    """`photo_defaults`, why in words, and for what ("photo folder" or "CIFAR"): a photo folder's
    choice (folder.photo_choice), or under --budget a CIFAR data set's (folder.cifar_budget_choice);
    nothing ({}, "", "") for other data or recipes."""
    from reslab.data.cifar import is_cifar_data
    from reslab.data.folder import PHOTO_MODEL_CHOICE, cifar_budget_choice, is_image_folder, photo_choice

    if cfg.recipe != "fast" or cfg.pretrained is not None:
        return {}, "", ""
    if is_image_folder(cfg.data):
        (chosen, why), source = photo_choice(cfg.data, budget=cfg.budget is not None), "photo folder"
    elif cfg.budget is not None and is_cifar_data(cfg.data):
        (chosen, why), source = cifar_budget_choice(), "CIFAR"
    else:
        return {}, "", ""
    if cfg.model is not None:
        for key in PHOTO_MODEL_CHOICE:
            chosen.pop(key)
    if cfg.budget is not None:
        chosen.pop("epochs", None)
    if cfg.optimizer not in (None, "sgd"):
        chosen.pop("lr", None)  # an SGD learning rate; Adam's comes from the recipe
    return chosen, why, source


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 15m, 900s, 1h, 1h30m or 90 (seconds)."""
    import re

    value = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", value)
    if not value or parts is None or not any(parts.groups()):
        raise ReslabError(f"--budget {text}: not a duration; write it as 15m, 900s, 1h or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ReslabError(f"--budget {text}: a budget must be longer than zero; give e.g. 15m")
    return total


def format_duration(seconds: float) -> str:
    """900 -> "15m", 5415 -> "1h30m15s", 42.5 -> "42.5s"."""
    seconds = round(float(seconds), 1)
    hours, rest = divmod(seconds, 3600)
    minutes, rest = divmod(rest, 60)
    text = (f"{int(hours)}h" if hours else "") + (f"{int(minutes)}m" if minutes else "")
    if rest or not text:
        text += f"{rest:g}s"
    return text
