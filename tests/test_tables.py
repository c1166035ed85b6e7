"""Tables as a pipe sees them (stdout not a terminal, COLUMNS unset): every name, class name, number and
path whole on one line, and text from files and folders printed literally, never read as rich markup.

Each command's table is fed fixed rows through its own data function, monkeypatched: nothing here
builds a model or reads a data set."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

LONG_NAMES = ["inception_resnet_v2", "resnext101_64x4d", "wide_resnet101_2"]
# A folder name is the class name: nothing stops it from looking like rich markup.
CLASSES = ["[bold]x", "a_rather_long_class_name_taken_from_a_folder_of_images", "cat"]
LONG_DIR = "/data/some/deeply/nested/folder/[bold]not-markup/of/experiments/with/a/long/name"


@pytest.fixture(autouse=True)
def piped(monkeypatch):
    # What `reslab ... | grep` sees: capsys's stdout is not a terminal; COLUMNS would fix a width.
    for name in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def parse(command, argv: list[str]) -> argparse.Namespace:
    """The command's own options, parsed as `reslab COMMAND ARGV` would."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def whole(out: str, text: str) -> bool:
    """`text` appears on one line of `out`, not cut, folded or wrapped."""
    return any(text in line for line in out.splitlines())


def test_models_table_keeps_every_name_and_number_whole(monkeypatch, capsys):
    from reslab.cli import models
    from reslab.models import catalog

    rows = [{"name": name, "family": "inception" if "incep" in name else "imagenet", "block": "bottleneck",
             "depth": 101, "image_size": 299, "params": 55_843_464 + k, "macs": 13_188_000_000 + k * 10**6,
             "residual_adds": 33} for k, name in enumerate(LONG_NAMES)]
    monkeypatch.setattr(catalog, "catalog", lambda *a, **k: rows)
    assert models.run(parse(models, [])) == 0
    out = capsys.readouterr().out
    for name in LONG_NAMES:
        assert re.search(rf"│ {name} +│ (inception|imagenet) +│ bottleneck +│ +101 │", out), out
    for number in ("55.84M", "13.188G", "13.189G", "299x299"):
        assert whole(out, number), out
    assert whole(out, "reslab models (MACs at each model's native input)")


def test_pretrained_table_keeps_weight_names_on_one_line(monkeypatch, tmp_path, capsys):
    from reslab import weights
    from reslab.cli import models

    folder = tmp_path / LONG_DIR.lstrip("/")
    monkeypatch.setattr(weights, "checkpoints_dir", lambda: folder)
    monkeypatch.setattr(models, "_params", lambda model: 83_455_272)  # no model is built
    names = [n for n in weights.list_models(pretrained=True)
             if n.startswith(("resnext101_64x4d", "wide_resnet101_2", "inception_resnet_v2"))]
    assert "resnext101_64x4d.tv_in1k" in names
    assert models.run(parse(models, ["--pretrained"])) == 0
    out = capsys.readouterr().out
    for name in names:
        assert re.search(rf"│ {re.escape(name)} +│ +\d+\.\d\d% +│ +83\.46M │", out), out
    assert whole(out, str(folder)), out  # the title's path, its [bold] included


def test_summary_table_keeps_layer_names_whole(monkeypatch, capsys):
    import reslab.models
    import reslab.models.summary
    from reslab.cli import summary
    from reslab.models.summary import LayerRow

    rows = [LayerRow("layer4.2.downsample.0", "Conv2d", (2048, 7, 7), 2_097_152, 102_760_448),
            LayerRow("layer4.2.add", "ResidualAdd", (2048, 7, 7), 0, 0),
            LayerRow("mixed_7c.branch_pool_concat", "Concat", (2048, 8, 8), 0, 0)]
    totals = {"params": 25_557_032, "trainable_params": 25_557_032, "macs": 4_089_184_256, "residual_adds": 16,
              "concats": 1}
    monkeypatch.setattr(reslab.models.summary, "uninitialized", lambda name, **options: None)
    monkeypatch.setattr(reslab.models, "layer_table", lambda model, size: rows)
    monkeypatch.setattr(reslab.models, "complexity", lambda model, size: totals)
    assert summary.run(parse(summary, ["resnet50"])) == 0
    out = capsys.readouterr().out
    assert re.search(r"│ layer4\.2\.downsample\.0 +│ Conv2d +│ +2048x7x7 │ +2,097,152 │ +102,760,448 │", out), out
    assert re.search(r"│ layer4\.2\.add +│ \(\+\) residual add │", out), out
    assert re.search(r"│ mixed_7c\.branch_pool_concat +│ \(\|\|\) concat +│", out), out
    assert whole(out, "Total params: 25,557,032   Trainable: 25,557,032   Non-trainable: 0")


def test_evaluate_prints_class_names_and_paths_literally(monkeypatch, capsys):
    import reslab.evaluate
    from reslab.cli import evaluate

    out_dir = LONG_DIR + "/eval-test"
    result = {"model": "resnext101_64x4d.tv_in1k", "data": LONG_DIR, "split": "test", "n": 30, "top1": 0.5,
              "top5": 1.0, "out": out_dir, "tta_note": f"test-time flip [on] from {LONG_DIR}",
              "balanced_accuracy": 0.5, "macro_f1": 0.2, "top_losses": [], "misclassified": [],
              "per_class": {c: {"precision": 0.125, "recall": 0.5, "f1": 0.2, "support": 10} for c in CLASSES},
              "average": {"macro": {"precision": 0.125, "recall": 0.5, "f1": 0.2, "support": 30}}}
    monkeypatch.setattr(reslab.evaluate, "evaluate", lambda *a, **k: result)
    assert evaluate.run(parse(evaluate, ["run"])) == 0
    out = capsys.readouterr().out
    for name in CLASSES:
        assert re.search(rf"│ {re.escape(name)} +│ +0\.125 │ +0\.500 │ .*│ +10 │", out), out
    assert whole(out, f"resnext101_64x4d.tv_in1k on {LONG_DIR} (test, 30 images)"), out
    assert whole(out, f"-> {out_dir}"), out
    assert whole(out, f"test-time flip [on] from {LONG_DIR}"), out


def test_explain_prints_image_and_class_names_literally(monkeypatch, tmp_path, capsys):
    import reslab.explain
    import reslab.inference.predictor
    from reslab import plots
    from reslab.cli import explain

    folder = tmp_path / "[bold]x"
    folder.mkdir()
    image = folder / "[red]a_photo_with_a_long_file_name_0001.jpg"
    image.write_bytes(b"")
    result = SimpleNamespace(image=None, overlay=lambda: None, top_k=[(CLASSES[1], 0.75)], class_name=CLASSES[0],
                             probability=0.25, layer="layer4")

    class FakeExplainer:
        def __init__(self, predictor, layer):
            self.predictor, self.layer = SimpleNamespace(meta=SimpleNamespace(model="inception_resnet_v2")), "layer4"

        def class_index(self, name):
            return 0

        def explain(self, image, name):
            return result

    monkeypatch.setattr(reslab.explain, "Explainer", FakeExplainer)
    monkeypatch.setattr(reslab.inference.predictor, "Predictor", lambda *a, **k: None)
    monkeypatch.setattr(plots, "gradcam", lambda path, *a, **k: Path(path))
    out_dir = tmp_path / "explanations [v2]" / "of" / "a" / "long" / "folder"
    assert explain.run(parse(explain, ["run", str(image), "--out", str(out_dir)])) == 0
    out = capsys.readouterr().out
    assert re.search(rf"│ {re.escape(image.name)} +│ \[bold\]x +│ +25\.0% +│ {CLASSES[1]} \(75\.0%\) +│", out), out
    assert whole(out, str(out_dir / f"{image.stem}-gradcam.png")), out


def test_bench_table_keeps_peer_names_and_flags_whole(capsys):
    from reslab.cli import bench

    hardware = {"cpu_capability": "AVX512", "cpu_bf16_native": True, "cpu_int8_vnni": True,
                "cpu_flags": ["avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"] * 4}
    names = ["textbook fp32 NCHW eager", "reslab openvino bf16 (BN folded ONNX, latency hint)",
             "plain openvino bf16 compile (throughput hint)"]
    results = [{"name": name, "model": "resnext101_64x4d", "mode": "infer", "batch_size": 32, "image_size": 224,
                "threads": 2, "precision": "bf16", "channels_last": True, "images_per_second": 1234.5 + k,
                "ms_per_batch": 25.9, "gflops_per_second": 12345.6, "peak_fraction": 0.42, "ratio": 1.25 + k,
                "hardware": hardware, "peak_precision": "bf16", "peak_gflops_per_second": 376.0}
               for k, name in enumerate(names)]
    bench._table(results, "resnext101_64x4d infer, peers in one process")
    out = capsys.readouterr().out
    for k, name in enumerate(names):
        assert re.search(rf"│ {re.escape(name)} +│ bf16 +│ +yes │ +{1234.5 + k:.1f} │ +25\.9 │ +12345\.6 │ +42% │ "
                         rf"+{1.25 + k:.2f}x │", out), out
    assert whole(out, "flags: " + " ".join(hardware["cpu_flags"])), out


def test_experiment_tables_keep_model_names_whole(monkeypatch, capsys):
    import reslab.experiments
    from reslab.cli import experiment

    sources = [LONG_DIR + "/runs/resnet110-[trained]/best.pt", "inception_resnet_small_plain"]
    summary = {"settings": {"out": LONG_DIR},
               "models": {s: {"std": [0.5, 1.25], "trained": True, "images": 1000, "split": "test"}
                          for s in sources}}

    def run_responses(config, progress):
        progress(0, 2, sources[0])
        return summary

    monkeypatch.setattr(reslab.experiments, "run_responses", run_responses)
    assert experiment.run(parse(experiment, ["responses", *sources])) == 0
    out = capsys.readouterr().out
    # The progress heading is one plain line in a pipe, not a rule as wide as the (unbounded) line.
    assert out.splitlines()[0] == f"-- model 1 of 2: {sources[0]} --", out
    for name in sources:
        assert re.search(rf"│ {re.escape(name)} +│ trained +│ +2 │ +0\.875 │ +1\.250 │ 1000 test │", out), out

    names = ["inception_resnet_small_plain", "resnext101_64x4d", "inception_resnet_v2"]
    summary = {"settings": {"epochs": 8, "image_size": 32, "precision_resolved": "bf16", "target_train_error": 0.05,
                            "out": LONG_DIR},
               "models": {name: {"params": 1_234_567, "final_train_error": 0.0123, "mean_train_error": 0.1234,
                                 "epochs_to_target": 3, "seconds_per_epoch": 12.5, "test_error": 0.0456}
                          for name in names}}
    monkeypatch.setattr(reslab.experiments, "run_inception", lambda config, progress: summary)
    assert experiment.run(parse(experiment, ["inception", *names, "--quiet"])) == 0
    out = capsys.readouterr().out
    for name in names:
        assert re.search(rf"{name} +1\.23M +1\.2% +12\.3% +3 +12\.5 +4\.6%", out), out


def test_renderer_takes_cells_and_titles_literally_and_whole_in_a_pipe():
    from reslab.cli.tables import console, table

    path = LONG_DIR + "/" + "x" * 200 + ".png"
    buffer = io.StringIO()
    console(file=buffer).print(table(f"classes of {path}", [("class", "left"), ("file", "left"), ("n", "right")],
                                     [[c, path, f"{10**12 + k:,}"] for k, c in enumerate(CLASSES)]))
    out = buffer.getvalue()
    for k, name in enumerate(CLASSES):
        assert re.search(rf"│ {re.escape(name)} +│ {re.escape(path)} │ {10**12 + k:,} │", out), out
    assert whole(out, f"classes of {path}"), out
    assert len(out.splitlines()) == 4 + len(CLASSES) + 1  # title, 3 header lines, rows, bottom


def test_a_pipe_gets_whole_lines_even_with_columns_set(monkeypatch):
    from reslab.cli.tables import console

    monkeypatch.setenv("COLUMNS", "40")
    buffer = io.StringIO()
    console(file=buffer).print("flags: " + " ".join(["avx512_bf16"] * 20), markup=False)
    assert buffer.getvalue().count("\n") == 1


def test_a_narrow_terminal_folds_other_columns_never_the_names():
    from rich.console import Console

    from reslab.cli.tables import table

    rows = [[name, "bottleneck block with a long description", "55,843,464"] for name in LONG_NAMES]
    terminal = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=60)
    terminal.print(table("models", [("name", "left"), ("block", "left"), ("params", "right")], rows))
    out = terminal.file.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 60, out
    for name in LONG_NAMES:
        assert re.search(rf"│ {name} +│", out), out
    assert not whole(out, "bottleneck block with a long description"), out  # folded to fit
