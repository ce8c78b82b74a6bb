"""The kernels of a trained demo model on a real image: hooks, and the paper's figure.

The demo model (``rednet_compact``) is trained for a few steps on a Fashion-MNIST subset with
``involution train``; ``involution show-kernels`` draws its kernels on a Fashion-MNIST test
image, and :func:`capture_kernels` is checked against :meth:`Involution2d.generate_kernels`.
The same run is exported with ``involution export --run``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from involution.cli import main
from involution.datasets.classification import build_transform
from involution.datasets.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from involution.train import checkpoint as ckpt
from involution.train.loading import load_trained_model
from involution.visualize.kernels import (
    COLOUR_BAR_INCHES,
    DPI,
    PANEL_INCHES,
    capture_kernels,
    default_layers,
    kernel_heatmaps,
    plot_kernels,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: two pytest workers on two cores do not oversubscribe them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    try:
        return find_fashion_mnist(download=False)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> Path:
    """The demo recipe, shortened: 256 training images, one epoch of 4 steps."""
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        f"data.root={fashion_mnist}",
        "data.train_subset=256",
        "data.val_subset=64",
        "train.epochs=1",
        "train.batch_size=64",
        "train.progress=false",
        f"output.dir={out}",
        "output.name=demo",
    ]
    assert main(["train", "--set", *overrides]) == 0
    return out / "demo"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> Path:
    """A Fashion-MNIST test image (an ankle boot) as a PNG file."""
    images, labels = load_fashion_mnist(fashion_mnist, "test")
    path = tmp_path_factory.mktemp("images") / "boot.png"
    Image.fromarray(images[int(np.flatnonzero(labels == 9)[0])]).save(path)
    return path


def test_captured_kernels_are_the_layers_kernels(run: Path, image: Path) -> None:
    model, config, _, in_chans = load_trained_model(run / ckpt.WEIGHTS_NAME, None, [])
    with Image.open(image) as picture:
        x = build_transform(config, train=False, channels=in_chans)(picture.convert("L"))[None]
    layers = default_layers(model)
    assert layers == ["stem.inv", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
    kernels = capture_kernels(model, x, layers)
    assert list(kernels) == layers
    # the stem's involution sees the stem's first conv block; recompute its kernels by hand
    stem = model.stem
    with torch.no_grad():
        expected = stem.inv.generate_kernels(stem.act1(stem.bn1(stem.conv1(x))))
    assert torch.equal(kernels["stem.inv"], expected)
    for name, tensor in kernels.items():
        layer = model.get_submodule(name)
        k = layer.kernel_size
        assert tensor.shape[1:4] == (layer.groups, k, k)
    assert kernel_heatmaps(kernels["layer3.0.conv2"]).shape == (1, 4, 4, 4)
    # a trained model's kernels differ from pixel to pixel
    assert kernels["stem.inv"][0, 0].flatten(2).std(dim=2).max() > 0
    with pytest.raises(ValueError, match="not involution layers"):
        capture_kernels(model, x, ["stem.conv1"])


def test_show_kernels_writes_the_figure(run: Path, image: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "kernels.png"
    pixels = ["14,14", "5,20", "22,8"]
    assert (
        main(
            ["show-kernels", "--run", str(run), str(image), "--out", str(out), "--pixels", *pixels]
        )
        == 0
    )
    assert (
        "layers stem.inv, layer1.0.conv2, layer2.0.conv2, layer3.0.conv2" in capsys.readouterr().out
    )
    with Image.open(out) as png:
        width, height = png.size
        pixels_rgb = np.asarray(png.convert("RGB"))
    # the input row, then 4 layers x (1 heatmap row + 3 pixel rows); 1 label column + 4 groups
    # (layer3: 64 / 16) + the colour bars
    expected_width = round((5 * PANEL_INCHES + COLOUR_BAR_INCHES) * DPI)
    assert (width, height) == (expected_width, round(17 * PANEL_INCHES * DPI))
    assert pixels_rgb.std() > 20  # not blank
    assert len(np.unique(pixels_rgb.reshape(-1, 3), axis=0)) > 100  # heatmaps, not flat panels


def test_export_the_trained_run(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo.onnx"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rednet_compact" in printed and "1x1x28x28" in printed and "2x1x36x26" in printed
    assert float(re.search(r"max relative difference: (\S+)", printed).group(1)) < 1e-4
    assert out.stat().st_size > 100_000


def test_plot_kernels_checks_its_arguments() -> None:
    kernels = {"layer": torch.randn(2, 3, 3, 4, 4)}
    image = torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="outside the 8x8 image"):
        plot_kernels(image, kernels, pixels=[(8, 0)])
    with pytest.raises(ValueError, match=r"must be \(G, K, K, h, w\)"):
        plot_kernels(image, {"layer": torch.randn(3, 3, 4, 4)})
    drawn = plot_kernels(image, kernels, max_groups=1)
    assert drawn.groups == (1,) and drawn.pixels == ((4, 4), (2, 2), (6, 6))


def test_show_kernels_errors(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "k.png")
    assert (
        main(
            ["show-kernels", "--model", "rednet_compact", str(tmp_path / "none.png"), "--out", out]
        )
        == 2
    )
    assert "cannot read image" in capsys.readouterr().err
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    args = ["show-kernels", "--model", "rednet_compact", str(tmp_path / "a.png"), "--out", out]
    assert main([*args, "--layers", "fc"]) == 2
    assert "not involution layers" in capsys.readouterr().err
    assert main([*args, "--pixels", "40,1"]) == 2
    assert "outside the 28x28 image" in capsys.readouterr().err
