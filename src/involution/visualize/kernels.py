"""The kernels an involution model generates on an image, and the paper's picture of them.

:func:`capture_kernels` runs a model once with forward hooks on its
:class:`~involution.ops.Involution2d` layers and returns the per-pixel kernels each generated
(recomputed from the layer's input by :meth:`~involution.ops.Involution2d.generate_kernels`,
so it works whichever path the layer ran: plain, span-fused or the fused inference op). The
model is not modified; the hooks are removed afterwards.

:func:`plot_kernels` draws them as in the paper's visualisation (``involution show-kernels``):
the input once, then for each chosen layer and each group a heatmap over the image of the sum
of each pixel's K x K kernel (its response to a constant input: where the group amplifies or
suppresses its channels), and, for a few chosen pixels, the K x K kernels themselves, one per
group, with a colour bar per layer for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor, nn

from involution.ops import Involution2d

__all__ = [
    "KernelFigure",
    "capture_kernels",
    "default_layers",
    "default_pixels",
    "involution_layers",
    "kernel_heatmaps",
    "plot_kernels",
]

#: Inches per panel, per colour-bar column, and dots per inch of :func:`plot_kernels`' figure.
PANEL_INCHES = 1.6
COLOUR_BAR_INCHES = 0.8
DPI = 100
#: Marker colours of the chosen pixels, in order.
PIXEL_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628")


def involution_layers(model: nn.Module) -> dict[str, Involution2d]:
    """Every :class:`Involution2d` of ``model`` by module name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Involution2d)}


def default_layers(model: nn.Module) -> list[str]:
    """The first involution under each top-level child (RedNet: the stem's, then each stage's
    first block), i.e. one layer per resolution."""
    chosen: dict[str, str] = {}
    for name in involution_layers(model):
        chosen.setdefault(name.split(".")[0], name)
    return list(chosen.values())


def capture_kernels(
    model: nn.Module, image: Tensor, layers: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Run ``model`` on ``image`` and return the kernels of the chosen involution layers.

    Args:
        model: any module containing :class:`Involution2d` layers; put it in eval mode first
            (in training mode its BatchNorms would update their statistics twice per layer).
        image: (B, C, H, W) input batch.
        layers: module names (see :func:`involution_layers`); ``None``: every involution.

    Returns:
        ``{name: (B, G, K, K, H_out, W_out)}`` in the order of ``layers``: the kernel of group
        ``g`` at output pixel ``(i, j)`` is ``[:, g, :, :, i, j]``. Computed without gradients.
    """
    modules = involution_layers(model)
    names = list(modules) if layers is None else list(layers)
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(
            f"{unknown} are not involution layers of {type(model).__name__}; "
            f"its involution layers: {list(modules)}"
        )
    captured: dict[str, Tensor] = {}

    def hook(name: str):
        def record(module: Involution2d, args: tuple, output: Tensor) -> None:
            captured[name] = module.generate_kernels(args[0]).detach()

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return {name: captured[name] for name in names}


def kernel_heatmaps(kernels: Tensor) -> Tensor:
    """(B, G, K, K, H, W) kernels -> (B, G, H, W): the sum of each pixel's K x K kernel."""
    return kernels.sum(dim=(2, 3))


def default_pixels(height: int, width: int) -> list[tuple[int, int]]:
    """The image centre and two points on its diagonal, as (y, x)."""
    return [(height // 2, width // 2), (height // 4, width // 4), (3 * height // 4, 3 * width // 4)]


def _feature_pixel(pixel: tuple[int, int], image_hw: tuple[int, int], map_hw: tuple[int, int]):
    """The kernel-map cell covering image pixel ``pixel`` (y, x)."""
    return tuple(min(p * m // i, m - 1) for p, i, m in zip(pixel, image_hw, map_hw, strict=True))


def _display_image(image: Tensor) -> Tensor:
    """(C, H, W) normalised input -> (H, W) or (H, W, 3) in [0, 1] for display."""
    shown = image[0] if image.shape[0] == 1 else image[:3].permute(1, 2, 0)
    shown = shown - shown.min()
    return shown / shown.max().clamp_min(1e-12)


@dataclass(frozen=True)
class KernelFigure:
    """What :func:`plot_kernels` drew: the figure, its size in pixels and the layout."""

    figure: Figure
    width_px: int
    height_px: int
    layers: tuple[str, ...]
    pixels: tuple[tuple[int, int], ...]
    groups: tuple[int, ...]


def _check_plot_arguments(
    image: Tensor, kernels: dict[str, Tensor], pixels: Sequence[tuple[int, int]]
) -> None:
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if not kernels:
        raise ValueError("no kernels to draw")
    height, width = image.shape[1:]
    for y, x in pixels:
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"pixel (y={y}, x={x}) is outside the {height}x{width} image")
    if len(pixels) > len(PIXEL_COLOURS):
        raise ValueError(f"at most {len(PIXEL_COLOURS)} pixels, got {len(pixels)}")
    for name, tensor in kernels.items():
        if tensor.dim() != 5:
            raise ValueError(
                f"kernels[{name!r}] must be (G, K, K, h, w), got {tuple(tensor.shape)}"
            )


def _label(ax: Axes, text: str, colour: str | None = None) -> None:
    """A row's label in its first column, after a marker of the pixel's colour if any."""
    if colour is not None:
        ax.plot(0.08, 0.5, "o", ms=8, mec="black", mew=0.6, color=colour)
    ax.text(0.18 if colour else 0.0, 0.5, text, fontsize=8, va="center", ha="left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def _colour_bar(figure: Figure, drawn: Any, ax: Axes, label: str) -> None:
    """A colour bar of ``drawn`` (an image) in ``ax``, drawn at a third of its width."""
    box = ax.get_position()
    ax.set_position((box.x0, box.y0, box.width / 3, box.height))
    bar = figure.colorbar(drawn, cax=ax)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def plot_kernels(
    image: Tensor,
    kernels: dict[str, Tensor],
    pixels: Sequence[tuple[int, int]] | None = None,
    max_groups: int = 8,
    path: str | PathLike | None = None,
) -> KernelFigure:
    """Draw the kernels of one image: the input once, then one block of rows per layer.

    The top row shows the input with the chosen pixels marked. In each layer's block the first
    row is, per group, the heatmap of :func:`kernel_heatmaps` upsampled (bilinear) over the
    input; each following row is one chosen pixel (its marker colour in the first column) and
    its K x K kernel per group. The heatmaps of a layer share one colour scale, its kernels
    another (both centred on zero), each with its colour bar at the end of the rows.

    Args:
        image: (C, H, W) model input (normalised; it is rescaled to [0, 1] for display).
        kernels: ``{layer: (G, K, K, h, w)}`` for this image (e.g. ``capture_kernels(...)[n][0]``).
        pixels: image pixels (y, x) whose kernels are drawn; default :func:`default_pixels`.
        max_groups: groups drawn per layer (the first ones).
        path: PNG file to write, if given.
    """
    pixels = default_pixels(*image.shape[1:]) if pixels is None else list(pixels)
    _check_plot_arguments(image, kernels, pixels)
    height, width = image.shape[1:]
    groups = {name: min(t.shape[0], max_groups) for name, t in kernels.items()}
    columns = 1 + max(groups.values())  # the row labels, then one column per group
    rows = 1 + len(kernels) * (1 + len(pixels))
    size = (columns * PANEL_INCHES + COLOUR_BAR_INCHES, rows * PANEL_INCHES)
    figure = Figure(figsize=size, dpi=DPI)
    grid = figure.add_gridspec(
        rows,
        columns + 1,
        width_ratios=[*([PANEL_INCHES] * columns), COLOUR_BAR_INCHES],
        left=0.01,
        right=0.99,
        bottom=0.2 / size[1],
        top=1 - 0.25 / size[1],
        wspace=0.15,
        hspace=0.3,
    )
    shown = _display_image(image.detach().float().cpu()).numpy()
    image_kwargs = {"cmap": "gray"} if shown.ndim == 2 else {}

    def panel(row: int, column: int, title: str = "") -> Axes:
        ax = figure.add_subplot(grid[row, column])
        ax.set_axis_off()
        ax.set_title(title, fontsize=7)
        return ax

    ax = panel(0, 0, f"input {height}x{width}")
    ax.imshow(shown, **image_kwargs)
    for (y, x), colour in zip(pixels, PIXEL_COLOURS, strict=False):
        ax.plot(x, y, "o", ms=5, mec="white", mew=0.8, color=colour)
    _label(
        panel(0, 1),
        "Per layer: the sum of each pixel's K x K kernel, per group\n(its response to a "
        "constant input), over the input;\nthen the kernels at the marked pixels.",
    )
    for block, (name, tensor) in enumerate(kernels.items()):
        tensor = tensor.detach().float().cpu()
        top = 1 + block * (1 + len(pixels))
        count, k = groups[name], tensor.shape[1]
        heat = F.interpolate(
            kernel_heatmaps(tensor[None, :count])[0][None],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0]
        heat_scale = heat.abs().amax().clamp_min(1e-12).item()
        _label(panel(top, 0), f"{name}\nK={k}, G={tensor.shape[0]}\nkernel sums")
        for g in range(count):
            ax = panel(top, 1 + g, f"group {g}")
            ax.imshow(shown, **image_kwargs)
            drawn = ax.imshow(
                heat[g].numpy(), cmap="coolwarm", vmin=-heat_scale, vmax=heat_scale, alpha=0.6
            )
        _colour_bar(figure, drawn, figure.add_subplot(grid[top, columns]), "kernel sum")
        scale = tensor[:count].abs().amax().clamp_min(1e-12).item()
        for row, pixel in enumerate(pixels, start=1):
            i, j = _feature_pixel(pixel, (height, width), tuple(tensor.shape[-2:]))
            text = f"pixel (y={pixel[0]}, x={pixel[1]})"
            _label(panel(top + row, 0), text, PIXEL_COLOURS[row - 1])
            for g in range(count):
                kernel = tensor[g, :, :, i, j].numpy()
                drawn = panel(top + row, 1 + g).imshow(
                    kernel, cmap="coolwarm", vmin=-scale, vmax=scale
                )
        bar = figure.add_subplot(grid[top + 1 : top + 1 + len(pixels), columns])
        _colour_bar(figure, drawn, bar, "kernel weight")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=DPI)
    return KernelFigure(
        figure,
        round(size[0] * DPI),
        round(size[1] * DPI),
        tuple(kernels),
        tuple(tuple(p) for p in pixels),
        tuple(groups.values()),
    )
