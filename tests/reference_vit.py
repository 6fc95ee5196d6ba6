"""An independent numpy forward pass of DINOv2, written from Hugging Face transformers'
`Dinov2Model` (eval mode), to check the toolkit's transformer path against.

Plain loops and matrix products, no TensorFlow, no KerasHub: patch projection, class and
register tokens, position embeddings resampled with PyTorch's bicubic kernels
(`interpolate(mode='bicubic', align_corners=False[, antialias=True])`), then per layer
LayerNorm ▸ multi-head attention ▸ layer scale ▸ residual ▸ LayerNorm ▸ MLP (exact GELU) ▸
layer scale ▸ residual, and the final LayerNorm. Weights are the checkpoint's own tensors by
their Hugging Face names (PyTorch layouts).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def _keys(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter a."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's 1-D bicubic resize (align_corners=False).

    Without antialias: four taps around the source point (i + 0.5) * n_in / n_out - 0.5, Keys
    a = -0.75, indices clamped to the border. With antialias: every source sample within the
    kernel's support, Keys a = -0.5 stretched by the scale when shrinking, weights normalised.
    """
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        if antialias:
            stretch = max(scale, 1.0)
            centre = (i + 0.5) * scale
            for j in range(n_in):
                m[i, j] = _keys((j + 0.5 - centre) / stretch, -0.5)
            m[i] /= m[i].sum()
        else:
            src = (i + 0.5) * scale - 0.5
            first = math.floor(src)
            for k in range(-1, 3):
                j = min(max(first + k, 0), n_in - 1)
                m[i, j] += _keys(src - (first + k), -0.75)
    return m


def interpolate_positions(pos: np.ndarray, h: int, w: int, antialias: bool) -> np.ndarray:
    """HF's `interpolate_pos_encoding`: [1, 1 + g*g, D] -> [1, 1 + h*w, D] (class row kept)."""
    g = int(round(math.sqrt(pos.shape[1] - 1)))
    if h == w == g:
        return pos
    grid = pos[0, 1:].reshape(g, g, -1)
    out = np.einsum(
        "ah,hwd,bw->abd", bicubic_matrix(g, h, antialias), grid, bicubic_matrix(g, w, antialias)
    )
    return np.concatenate([pos[:, :1], out.reshape(1, h * w, -1)], axis=1)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def dinov2_tokens(w: dict, config: dict, image: np.ndarray) -> np.ndarray:
    """DINOv2's last hidden state for one preprocessed image.

    Args:
      w: the checkpoint's tensors by Hugging Face name (float64 is used throughout).
      config: its config.json.
      image: float [H, W, 3], already normalised; H and W multiples of the patch size.

    Returns:
      float64 [1 + registers + (H/p)(W/p), D]: class token, registers, patches row by row.
    """
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    p, d, heads = config["patch_size"], config["hidden_size"], config["num_attention_heads"]
    eps = config["layer_norm_eps"]
    h, wd = image.shape[0] // p, image.shape[1] // p
    # Patch (i, j) flattened as the Conv2d weight [D, C, kh, kw] is.
    patches = image[: h * p, : wd * p].reshape(h, p, wd, p, 3).transpose(0, 2, 4, 1, 3)
    kernel = w["embeddings.patch_embeddings.projection.weight"].reshape(d, -1)
    x = patches.reshape(h * wd, -1) @ kernel.T + w["embeddings.patch_embeddings.projection.bias"]
    x = np.concatenate([w["embeddings.cls_token"][0], x], axis=0)
    registers = config.get("num_register_tokens", 0)
    pos = interpolate_positions(w["embeddings.position_embeddings"], h, wd, registers > 0)
    x = x + pos[0]
    if registers:
        x = np.concatenate([x[:1], w["embeddings.register_tokens"][0], x[1:]], axis=0)
    hd = d // heads
    for i in range(config["num_hidden_layers"]):
        pre = f"encoder.layer.{i}"
        y = layer_norm(x, w[f"{pre}.norm1.weight"], w[f"{pre}.norm1.bias"], eps)
        q, k, v = (
            _linear(y, w, f"{pre}.attention.attention.{n}")
            .reshape(-1, heads, hd)
            .transpose(1, 0, 2)
            for n in ("query", "key", "value")
        )
        attention = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd)) @ v
        y = _linear(attention.transpose(1, 0, 2).reshape(-1, d), w, f"{pre}.attention.output.dense")
        x = x + y * w[f"{pre}.layer_scale1.lambda1"]
        y = layer_norm(x, w[f"{pre}.norm2.weight"], w[f"{pre}.norm2.bias"], eps)
        y = _linear(gelu(_linear(y, w, f"{pre}.mlp.fc1")), w, f"{pre}.mlp.fc2")
        x = x + y * w[f"{pre}.layer_scale2.lambda1"]
    return layer_norm(x, w["layernorm.weight"], w["layernorm.bias"], eps)


def imagenet_normalize(rgb: np.ndarray) -> np.ndarray:
    """DINOv2's preprocessing of RGB 0..255: ImageNet mean and standard deviation."""
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    return (np.asarray(rgb, np.float64) / 255.0 - mean) / std
