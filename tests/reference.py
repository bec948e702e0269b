"""Float64 NumPy references that the tests compare jaxbn against."""

import numpy as np


def batch_stats(x, axis=-1, mask=None):
    """Mean and biased variance per feature of ``x`` (float64), over valid elements."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    if mask is None:
        return moved.mean(0), moved.var(0)
    valid = np.moveaxis(np.broadcast_to(mask, x.shape), axis, -1).reshape(-1, x.shape[axis])
    count = valid.sum(0)
    mean = np.where(valid, moved, 0).sum(0) / np.maximum(count, 1)
    var = np.where(valid, (moved - mean) ** 2, 0).sum(0) / np.maximum(count, 1)
    return mean, var


def normalize(x, mean, var, scale=None, bias=None, axis=-1, epsilon=1e-5):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` in float64, features on ``axis``."""
    x = np.asarray(x, np.float64)
    shape = [1] * x.ndim
    shape[axis % x.ndim] = x.shape[axis]
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    y = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape) + epsilon)
    if scale is not None:
        y = y * np.reshape(np.asarray(scale, np.float64), shape)
    if bias is not None:
        y = y + np.reshape(np.asarray(bias, np.float64), shape)
    return y


def batch_norm_steps(batches, momentum=0.99, epsilon=1e-5, axis=-1, scale=None, bias=None):
    """Runs training-mode batch norm over ``batches``; returns outputs and final state."""
    features = np.asarray(batches[0]).shape[axis]
    mean_state, var_state = np.zeros(features), np.ones(features)
    outputs = []
    for x in batches:
        mean, var = batch_stats(x, axis)
        outputs.append(normalize(x, mean, var, scale, bias, axis, epsilon))
        mean_state = momentum * mean_state + (1 - momentum) * mean
        var_state = momentum * var_state + (1 - momentum) * var
    return outputs, {"mean": mean_state, "var": var_state}


def batch_norm_grads(x, w, scale, axis=-1, epsilon=1e-5):
    """Float64 gradients of ``sum(w * batch_norm(x))`` w.r.t. x, scale and bias.

    With ``r = 1/sqrt(var + eps)``, ``xhat = (x - mean) r`` and ``g = w * scale``:
    ``dx = r (g - mean(g) - xhat mean(g xhat))``, ``dscale = sum(w xhat)``,
    ``dbias = sum(w)``, the means and sums over every axis but ``axis``.
    """
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    axis = axis % x.ndim
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean, var = batch_stats(x, axis)
    r = (1.0 / np.sqrt(var + epsilon)).reshape(shape)
    xhat = (x - mean.reshape(shape)) * r
    g = w * np.asarray(scale, np.float64).reshape(shape)
    dx = r * (
        g - g.mean(reduce_axes, keepdims=True) - xhat * (g * xhat).mean(reduce_axes, keepdims=True)
    )
    return dx, (w * xhat).sum(reduce_axes), w.sum(reduce_axes)


def per_example_norm(
    x, reduction_axes, feature_axes, scale=None, bias=None, mask=None, epsilon=1e-6, center=True
):
    """Layer/instance/RMS norm in float64: statistics over ``reduction_axes`` (valid elements only).

    ``scale`` and ``bias`` have the sizes of ``feature_axes`` and broadcast along
    the others; ``center=False`` divides by the root mean square instead.
    """
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    count = valid.sum(reduction_axes, keepdims=True)
    mean = np.where(valid, x, 0).sum(reduction_axes, keepdims=True) / count if center else 0.0
    var = np.where(valid, (x - mean) ** 2, 0).sum(reduction_axes, keepdims=True) / count
    y = (x - mean) / np.sqrt(var + epsilon)
    shape = [x.shape[i] if i in feature_axes else 1 for i in range(x.ndim)]
    if scale is not None:
        y = y * np.reshape(np.asarray(scale, np.float64), shape)
    if bias is not None:
        y = y + np.reshape(np.asarray(bias, np.float64), shape)
    return y
