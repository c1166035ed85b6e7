"""Evaluation: a checkpoint on a data split -> top-1, top-5, per-class precision/recall/F1, balanced
accuracy, the top losses and every mistake by file, figures.

The data is re-read with the checkpoint's own preprocessing (image size, channels, mean/std), and
through `reslab.inference.Predictor`, the same door `reslab predict` uses, so the two agree.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reslab.checkpoint import resolve
from reslab.errors import ReslabError
from reslab.io import write_json

EVAL_JSON, CONFUSION_PNG, SAMPLES_PNG, TOP_LOSSES_PNG = "eval.json", "confusion.png", "samples.png", "top_losses.png"
SAMPLE_COUNT, SAMPLE_WRONG = 32, 8  # the grid shows up to 32 images, up to 8 of them mistakes
TOP_LOSSES = 16  # `--top-losses` where the images have files (image folders)


@dataclass
class EvalSet:
    images: torch.Tensor  # uint8 N x C x H x W
    labels: torch.Tensor  # int64, indices into the checkpoint's classes
    split: str  # "test", "val", "train" or "all" (a folder of class subfolders, evaluated whole)
    paths: list[str] | None = None  # each image's file (image folders); None for digits and CIFAR


def _is_split_folder(path: Path) -> bool:
    from reslab.data.folder import SPLIT_NAMES

    subdirs = [d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(subdirs) and set(subdirs) <= set(SPLIT_NAMES)


def load_eval_set(data: str, meta, split: str | None = None, *, data_dir: str | None = None) -> EvalSet:
    """The images of `data` to evaluate `meta`'s checkpoint on, preprocessed as it was trained."""
    from reslab.data import load_data

    if split not in (None, "test", "val"):
        raise ReslabError(f"--split must be test or val, got {split!r}")
    pre, extra = meta.preprocessing, meta.extra
    same_data = data == extra.get("data")
    seed = extra.get("seed", 0) if same_data else 0
    path = Path(data).expanduser()
    whole_folder = data not in ("digits", "cifar10", "cifar100") and path.is_dir() and not _is_split_folder(path)
    if whole_folder:
        # A folder of class subfolders is evaluated whole: no split is carved out of it.
        if split is not None:
            raise ReslabError(f"{data} is a folder of class subfolders, evaluated whole; drop --split "
                              "(or give a folder with test/ or val/)")
        val_split = 0.0
    else:
        val_split = extra.get("val_split") if same_data else None
    # Weights evaluated as their publishers do (resize the shorter side to resize_size, crop the centre
    # image_size): the data is decoded at resize_size, whose centre crop is that same crop.
    size, resize_size = pre.get("image_size"), pre.get("resize_size") or pre.get("image_size")
    bundle = load_data(data, image_size=resize_size, val_split=val_split, seed=seed, data_dir=data_dir, quiet=True)
    if whole_folder:
        part, name = bundle.train, "all"
    else:
        name = split or ("test" if bundle.test is not None else "val")
        part = bundle.test if name == "test" else bundle.val
        if part is None:
            have = [k for k in ("test", "val") if getattr(bundle, k) is not None]
            raise ReslabError(f"{data} has no {name} split; give --split {have[0]}" if have else
                              f"{data} has neither a test nor a val split; give a folder of class subfolders")
    want = pre.get("in_channels", 3)
    if part.images.shape[1] != want:
        raise ReslabError(f"the checkpoint takes {want}-channel images but {data} gives "
                          f"{part.images.shape[1]}-channel ones; evaluate it on data like its training data")
    classes = list(meta.classes)
    lookup = class_lookup(bundle.classes, classes)
    unknown = [c for c in bundle.classes if c not in lookup]
    if unknown:
        raise ReslabError(f"{data} has {len(unknown)} class(es) the weights do not know ({_names(unknown)}); the "
                          f"weights know {len(classes)} ({_names(classes)}): evaluate on data whose class folders "
                          "are named as the weights' classes (a subset is fine)")
    # Classes matched by name (another order, or a subset of the weights' classes).
    to_ckpt = torch.tensor([lookup[c] for c in bundle.classes], dtype=torch.int64)
    images = part.images
    if resize_size != size:
        top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
        images = images[:, :, top:top + size, left:left + size].contiguous()
    return EvalSet(images, to_ckpt[part.labels], name, part.paths)


def _plain(name: str) -> str:
    """A class name as people vary it: case, separators, a plural "s" ("Golden_Retrievers" ~ "golden retriever")."""
    name = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


def class_lookup(data_classes: list[str], weight_classes: list[str]) -> dict[str, int]:
    """Each data class's index among the weights' classes: by exact name, else by the plain form when
    exactly one of the weights' classes has it."""
    exact = {c: i for i, c in enumerate(weight_classes)}
    plain: dict[str, list[int]] = {}
    for i, c in enumerate(weight_classes):
        plain.setdefault(_plain(c), []).append(i)
    lookup = {}
    for c in data_classes:
        if c in exact:
            lookup[c] = exact[c]
        elif len(plain.get(_plain(c), [])) == 1:
            lookup[c] = plain[_plain(c)][0]
    return lookup


def _names(classes, limit: int = 6) -> str:
    shown = ", ".join(classes[:limit])
    return shown + (", ..." if len(classes) > limit else "")


# Weights with many classes (ImageNet's 1000) evaluated on a folder of a few of them: the per-class
# table and the confusion matrix show the folder's classes, with every other prediction as "other".
OTHER = "(other)"
MAX_SHOWN_CLASSES = 50


def metrics(probabilities: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """top1, top5 (top-min(5, classes)), n, per_class precision/recall/f1/support, average (macro and
    weighted), balanced_accuracy, macro_f1, confusion, loss."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n, num_classes = probabilities.shape
    present = sorted(set(labels.tolist()))
    if num_classes > MAX_SHOWN_CLASSES and len(present) < num_classes:
        result = metrics(_fold_other(probabilities, present), _relabel(labels, present),
                         [classes[i] for i in present] + [OTHER])
        top = probabilities.topk(min(5, num_classes), dim=1).indices
        result["top1"] = float((probabilities.argmax(1) == labels).float().mean()) if n else None
        result["top5"] = float((top == labels[:, None]).any(1).float().mean()) if n else None
        result["per_class"].pop(OTHER)
        return result
    y_true, y_pred = labels.numpy(), probabilities.argmax(1).numpy()
    k = min(5, num_classes)
    top5 = (probabilities.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    ids = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    picked = probabilities[torch.arange(n), labels].clamp_min(1e-12)
    return {
        "top1": float((y_true == y_pred).mean()) if n else None,
        "top5": top5 if n else None,
        "n": int(n),
        "loss": float(-picked.log().mean()) if n else None,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "accuracy": float(recall[i]),
                "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        **_averages(y_true, y_pred, present),
        "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def _averages(y_true: np.ndarray, y_pred: np.ndarray, present: list[int]) -> dict:
    """scikit-learn's macro and weighted precision/recall/F1 and its balanced accuracy, over the classes
    the data has (a class of the weights absent from the data would count as a zero in the macro mean)."""
    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

    if len(y_true) == 0:
        return {"average": {}, "balanced_accuracy": None, "macro_f1": None}
    average = {}
    for kind in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=kind, zero_division=0)
        average[kind] = {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(len(y_true))}
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": predictions of a class the data lacks are mistakes,
        # which is what the score counts them as.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {"average": average, "balanced_accuracy": float(balanced), "macro_f1": average["macro"]["f1"]}


def rank_losses(probabilities: torch.Tensor, labels: torch.Tensor, classes: list[str], paths: list[str] | None,
                count: int) -> tuple[list[dict], list[dict], list[int]]:
    """(top_losses, misclassified, the top ones' indices): the `count` images with the highest loss
    -log p(true class), the ones the model is most confidently wrong about (fastai's top losses), and
    every mistake, highest loss first. Rows are {file, true, predicted, p_predicted, loss}; `file` is
    the image's path, or "#i" (its position in the evaluated split) for data without files."""
    n = len(labels)
    loss = -probabilities[torch.arange(n), labels].clamp_min(1e-12).log()
    p_predicted, predicted = probabilities.max(1)
    order = torch.argsort(loss, descending=True, stable=True).tolist()

    def row(i: int) -> dict:
        return {"file": paths[i] if paths is not None else f"#{i}", "true": classes[labels[i]],
                "predicted": classes[predicted[i]], "p_predicted": float(p_predicted[i]), "loss": float(loss[i])}

    top = order[:count]
    return [row(i) for i in top], [row(i) for i in order if predicted[i] != labels[i]], top


def _fold_other(probabilities: torch.Tensor, present: list[int]) -> torch.Tensor:
    """Scores over the present classes plus one column, the best of the others: the arg-max of the result
    is the true prediction, with any class outside the folder's read as "other"."""
    others = torch.ones(probabilities.shape[1], dtype=torch.bool)
    others[present] = False
    return torch.cat([probabilities[:, present], probabilities[:, others].max(1, keepdim=True).values], dim=1)


def _relabel(labels: torch.Tensor, present: list[int]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(present)}
    return torch.tensor([index[c] for c in labels.tolist()], dtype=torch.int64)


def sample_indices(correct: np.ndarray, count: int = SAMPLE_COUNT, wrong_max: int = SAMPLE_WRONG) -> np.ndarray:
    """Up to `count` indices, evenly spread, with up to `wrong_max` mistakes among them; ascending."""

    def spread(index: np.ndarray, k: int) -> np.ndarray:
        k = min(k, len(index))
        return index[np.linspace(0, len(index) - 1, k).round().astype(int)] if k > 0 else index[:0]

    wrong = spread(np.flatnonzero(~correct), wrong_max)
    right = spread(np.flatnonzero(correct), count - len(wrong))
    return np.unique(np.concatenate([wrong, right]))


def check_top_losses(count: int | None) -> None:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ReslabError(f"--top-losses must be a count of images, 0 or more (0: no top_losses.png), got {count!r}")


def default_out(source: str | os.PathLike, data: str) -> Path:
    """RUN/eval-<data> for a run, beside a weights file, runs/<name>-eval-<data> for catalog weights."""
    from reslab.train.state import safe_name

    path = Path(source)
    if not path.exists():  # catalog weights or a URL
        return Path("runs") / f"{safe_name(str(source))}-eval-{safe_name(data)}"
    run_dir = path if path.is_dir() else path.parent
    return run_dir / f"eval-{safe_name(data)}"


def evaluate(source: str | os.PathLike, *, data: str | None = None, split: str | None = None,
             out: str | os.PathLike | None = None, device: str = "cpu", data_dir: str | None = None,
             backend: str = "auto", precision: str = "auto", model: str | None = None, classes=None,
             calibration: str | None = None, calibration_images: int | None = None, tta: str | None = None,
             top_losses: int | None = None) -> dict:
    """Evaluate any model source (see reslab.weights.load_source) or exported file; writes eval.json,
    confusion.png, samples.png, top_losses.png. `calibration`, `calibration_images`: for precision int8
    (see Predictor). `tta`: test-time augmentation ("none", "flip"); None: what the run's training found
    paying. `top_losses`: how many images top_losses.png shows (0: none); None: 16 where the images
    have files (image folders), none for digits and CIFAR, whose mistakes eval.json lists by index."""
    from reslab import plots
    from reslab.inference.predictor import Predictor

    check_top_losses(top_losses)
    path = Path(source)
    checkpoint = resolve(source) if path.is_dir() else source
    predictor = Predictor(checkpoint, device=device, backend=backend, precision=precision, model=model,
                          classes=classes, calibration=calibration, calibration_images=calibration_images, tta=tta)
    data = data or predictor.meta.extra.get("data")
    if not data:
        raise ReslabError(f"{checkpoint} does not say which data it was trained on; give --data")
    eval_set = load_eval_set(data, predictor.meta, split, data_dir=data_dir)
    probabilities = predictor.probabilities(eval_set.images).cpu()
    classes = list(predictor.classes)
    result = {"checkpoint": str(checkpoint), "model": predictor.meta.model, "data": data, "split": eval_set.split,
              "backend": predictor.backend, "precision": predictor.precision, "tta": predictor.tta,
              **metrics(probabilities, eval_set.labels, classes)}
    if tta is None and predictor.tta != "none":
        gain = predictor.meta.extra.get("tta_val_acc") or {}
        result["tta_note"] = (f"test-time augmentation: {predictor.tta} (the run's training measured it on its "
                              f"validation split: {gain.get('none', float('nan')):.4f} without, "
                              f"{gain.get(predictor.tta, float('nan')):.4f} with); --tta none turns it off")
    out = Path(out) if out is not None else default_out(source, data)
    predicted = probabilities.argmax(1)
    shown = list(result["per_class"]) + ([OTHER] if len(result["confusion"]) > len(result["per_class"]) else [])
    plots.confusion(out / CONFUSION_PNG, np.asarray(result["confusion"]), shown,
                    title=f"{predictor.meta.model} on {Path(data).name or data} ({eval_set.split}): "
                          f"top-1 {result['top1']:.3f}")
    pick = sample_indices((predicted == eval_set.labels).numpy())
    plots.samples(out / SAMPLES_PNG, eval_set.images[pick].numpy(), eval_set.labels[pick].tolist(),
                  predicted[pick].tolist(), classes, probabilities=probabilities[pick].max(1).values.tolist())
    count = (TOP_LOSSES if eval_set.paths is not None else 0) if top_losses is None else top_losses
    result["top_losses"], result["misclassified"], top = rank_losses(probabilities, eval_set.labels, classes,
                                                                     eval_set.paths, count)
    if top:
        plots.top_losses(out / TOP_LOSSES_PNG, eval_set.images[top].numpy(), result["top_losses"])
    else:
        (out / TOP_LOSSES_PNG).unlink(missing_ok=True)  # not a figure left from an earlier evaluation
    result["out"] = str(out)
    write_json(out / EVAL_JSON, result)
    return result
