"""Learned filters as a picture, as in the lecture's "what do convolutional filters learn": a grid of
small images, one per filter (RGB for a 3-channel input, else one grey tile per input channel), each
scaled around zero (mid-grey) to its own largest magnitude. Written as a PNG with zlib alone."""
from __future__ import annotations

import struct
import zlib

import numpy as np

from .errors import GraphConvError


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image [H, W, 3] as PNG bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def filter_grid(weight: np.ndarray, max_channels=16, tile=36, gap=3) -> np.ndarray:
    """[OC, C, KH, KW] conv weights -> an RGB image: one row per output channel; a 3-channel filter
    is one colour tile, any other one grey tile per input channel (the first `max_channels`)."""
    if weight.ndim != 4:
        raise GraphConvError(f"filters are drawn for 2-D convolutions (weight [out, in, kh, kw]), got a "
                             f"{weight.ndim}-D weight")
    oc, c, kh, kw = weight.shape
    colour = c == 3
    cols = 1 if colour else min(c, max_channels)
    scale = max(1, tile // max(kh, kw))
    th, tw = kh * scale, kw * scale
    per_row = cols if cols > 1 else min(oc, 10)       # one filter per tile: several filters to a row
    rows = oc if cols > 1 else -(-oc // per_row)
    img = np.full((rows * (th + gap) + gap, per_row * (tw + gap) + gap, 3), 255, np.uint8)
    for f in range(oc):
        w = weight[f].astype(np.float64)
        w = w / (np.abs(w).max() or 1.0)                       # this filter's own scale, zero at mid-grey
        tiles = [np.moveaxis(w, 0, -1)] if colour else [np.repeat(w[i][..., None], 3, axis=2) for i in range(cols)]
        for j, t in enumerate(tiles):
            r, k = (f, j) if cols > 1 else divmod(f, per_row)
            pixels = np.kron(np.clip(127.5 + 127.5 * t, 0, 255), np.ones((scale, scale, 1)))
            y, x = gap + r * (th + gap), gap + k * (tw + gap)
            img[y:y + th, x:x + tw] = pixels.astype(np.uint8)
    return img


def conv_layers(graph) -> list:
    """(layer, weight param name) of every 2-D convolution, in order."""
    out = []
    for node in graph.topo():
        if node.op == "conv2d":
            out.append((node.layer, graph.operands(node.name)[1]))
    return out


def filters_png(graph, state: dict, layer=None) -> tuple:
    """(layer, PNG bytes) of a conv layer's filters (the first conv when `layer` is None)."""
    convs = conv_layers(graph)
    if not convs:
        raise GraphConvError(f"{graph.name} has no 2-D convolution whose filters could be drawn")
    names = [name for name, _ in convs]
    if layer is None:
        layer, weight_name = convs[0]
    elif layer not in names:
        raise GraphConvError(f"{graph.name} has no conv layer {layer!r} (its conv layers: {', '.join(names)})")
    else:
        weight_name = dict(convs)[layer]
    if weight_name not in state:
        raise GraphConvError(f"the weights file has no {weight_name} (written for another model?)")
    return layer, png_bytes(filter_grid(np.asarray(state[weight_name])))
