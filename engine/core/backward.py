"""The backward kernels: the vector-Jacobian product of every kernel of engine.core.kernels, in the
same order as that module, NumPy or CuPy alike.

Convention (llm.c's): `f_backward` takes f's arguments in f's order, then the cotangent of f's
output (`dy`: the gradient of the loss with respect to f's output, same shape), and returns the
gradients of f's differentiable arguments, in f's order. Where the gradient is written in f's
output (softmax, tanh), the backward takes that output instead of recomputing it, and says so.
Each docstring derives the gradient in two or three lines; letters as in engine.core.kernels.

Gradients follow the chain rule of the formulas as written (automatic differentiation's semantics,
what tf.GradientTape computes), also where float32 rounding makes the function locally constant:
see apply_attention_mask_backward.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from engine.core.backend import array_module
from engine.core import kernels as K
from engine.core.kernels import GELU_TANH_COEFF, SQRT_2_OVER_PI


def _sum_leading(a):
    """Sum over every axis but the last. [...,F] -> [F]"""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


def scatter_add_rows(num_rows, ids, rows):
    """table[ids[j]] += rows[j] into a zero table, repeated ids summed. [M] ints, [M,H] -> [num_rows,H]

    NumPy: sorts the ids once and sums each run with add.reduceat (deterministic, and much faster
    than add.at over a 30522-row table); CuPy: cupyx.scatter_add.
    """
    xp = array_module(rows)
    table = xp.zeros((num_rows, rows.shape[-1]), dtype=rows.dtype)
    ids = ids.reshape(-1)
    rows = rows.reshape(-1, rows.shape[-1])
    if ids.size == 0:
        return table
    if xp is numpy:
        order = numpy.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = numpy.flatnonzero(numpy.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        table[sorted_ids[starts]] = numpy.add.reduceat(rows[order], starts, axis=0)
    else:
        import cupyx
        cupyx.scatter_add(table, ids, rows)
    return table


@dataclasses.dataclass
class RowGradient:
    """The gradient of an embedding table as the rows that were looked up (tf.gather's
    IndexedSlices): values[j] belongs to row ids[j]; repeated ids are separate entries until
    summed. A few thousand rows instead of a [V,H] table."""
    ids: object                   # [M] ints
    values: object                # [M,H]
    num_rows: int                 # V

    def summed(self):
        """(unique ids [U], their summed rows [U,H])."""
        xp = array_module(self.values)
        unique, inverse = xp.unique(self.ids, return_inverse=True)
        return unique, scatter_add_rows(int(unique.shape[0]), inverse.reshape(-1), self.values)

    def dense(self):
        """The [V,H] table."""
        return scatter_add_rows(self.num_rows, self.ids, self.values)

    def scaled(self, factor) -> "RowGradient":
        return RowGradient(self.ids, self.values * factor, self.num_rows)


# ---------------------------------------------------------------------------- elementwise & norms

def gelu_tanh_backward(x, dy):
    """y = 0.5x(1+t), t = tanh(u), u = k(x + c x^3):
        dy/dx = 0.5(1+t) + 0.5x(1-t^2) k(1 + 3c x^2).                          [...] -> [...]"""
    xp = array_module(x)
    c, k, half, one, three = (x.dtype.type(v) for v in (GELU_TANH_COEFF, SQRT_2_OVER_PI, 0.5, 1.0, 3.0))
    t = xp.tanh(k * (x + c * (x * x * x)))
    return dy * (half * (one + t) + half * x * (one - t * t) * k * (one + three * c * (x * x)))


def gelu_erf_backward(x, dy):
    """y = 0.5x(1 + erf(x/sqrt2)):
        dy/dx = 0.5(1 + erf(x/sqrt2)) + x e^(-x^2/2) / sqrt(2 pi).              [...] -> [...]"""
    xp = array_module(x)
    x64 = x.astype("float64")
    slope = 0.5 * K.erfc(-x64 * K.SQRT_HALF) + x64 * xp.exp(-0.5 * x64 * x64) / math.sqrt(2.0 * math.pi)
    return dy * slope.astype(x.dtype)     # the slope in float64 as the forward, rounded once


GELU_BACKWARDS = {"gelu_tanh": gelu_tanh_backward, "gelu_erf": gelu_erf_backward}


def gelu_backward(x, dy, kind="gelu_tanh"):
    """The backward of K.gelu(x, kind). [...] -> [...]"""
    return GELU_BACKWARDS[kind](x, dy)


def geglu_backward(x, gate, dy, kind="gelu_tanh"):
    """y = gelu(x) * gate, the product rule:
        dx = gelu'(x) * (dy * gate),  dgate = dy * gelu(x).                     [...] -> ([...], [...])
    gelu(x) is recomputed rather than kept: the tape keeps y (the output product's input) instead."""
    dgate = dy * K.gelu(x, kind)
    return gelu_backward(x, dy * gate, kind), dgate


def layer_norm_backward(x, gamma, beta, eps, dy):
    """y = xhat*gamma + beta, xhat = (x - mean) * r, r = 1/sqrt(var + eps), over the last axis (H):
        dgamma = sum xhat*dy, dbeta = sum dy (over all leading axes); with g = dy*gamma,
        dx = r * (g - mean(g) - xhat * mean(g*xhat))  (the mean and var terms of d xhat/dx).
    [...,H] -> ([...,H], [H], [H])"""
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)                                        # [...,1]
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    r = x.dtype.type(1.0) / xp.sqrt(var + x.dtype.type(eps))                     # [...,1]
    xhat = centered * r                                                          # [...,H]
    g = dy * gamma                                                               # [...,H]
    dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, _sum_leading(dy * xhat), _sum_leading(dy)


def dense_backward(x, kernel, bias, dy):
    """y = x·W + b:  dx = dy·W^T,  dW = x^T·dy (summed over leading axes),  db = sum dy.
    [...,C] @ [C,F] -> ([...,C], [C,F], [F])"""
    C, F = kernel.shape
    dx = K.matmul_2d(dy, kernel.T)                                               # [...,F] @ [F,C] -> [...,C]
    dkernel = x.reshape(-1, C).T @ dy.reshape(-1, F)                             # [C,M] @ [M,F] -> [C,F]
    return dx, dkernel, _sum_leading(dy)


def dropout_backward(x, keep, rate, dy):
    """y = x * keep / (1 - rate):  dx = dy * keep / (1 - rate), the forward's mask reused. [...] -> [...]"""
    if keep is None or rate == 0.0:
        return dy
    return dy * (keep * dy.dtype.type(1.0 / (1.0 - rate)))


# ---------------------------------------------------------------------------- embeddings

def embed_backward(word_ids, type_ids, word_table, position_table, type_table, de):
    """e[b,s] = word[ids[b,s]] + position[s] + type[types[b,s]]: each table row receives the sum of
    de over the positions that read it (a scatter-add; position rows past S receive zero).
    [B,S,H] -> ([V,H], [P,H], [2,H])"""
    S = word_ids.shape[1]
    xp = array_module(de)
    dword = scatter_add_rows(word_table.shape[0], word_ids, de)                  # [V,H]
    dposition = xp.zeros_like(position_table)                                    # [P,H]
    dposition[:S] = de.sum(axis=0)
    dtype_table = scatter_add_rows(type_table.shape[0], type_ids, de)            # [2,H]
    return dword, dposition, dtype_table


# ---------------------------------------------------------------------------- attention

def qkv_projection_backward(x, kernel, bias, dy):
    """y[b,s,n,d] = sum_h x[b,s,h] W[h,n,d] + b[n,d]: dense_backward on W viewed as [H,N*D].
    [B,S,N,D] -> ([B,S,H], [H,N,D], [N,D])"""
    H, N, D = kernel.shape
    dx, dkernel, dbias = dense_backward(x, kernel.reshape(H, N * D), bias.reshape(N * D),
                                        dy.reshape(dy.shape[0], dy.shape[1], N * D))
    return dx, dkernel.reshape(H, N, D), dbias.reshape(N, D)


def raw_attention_scores_backward(q, k, draw):
    """raw[b,n,s,t] = sum_d q[b,s,n,d] k[b,t,n,d]:
        dq[b,s,n,:] = sum_t draw[b,n,s,t] k[b,t,n,:],  dk[b,t,n,:] = sum_s draw[b,n,s,t] q[b,s,n,:].
    [B,N,S,T] -> ([B,S,N,D], [B,T,N,D])"""
    dq = draw @ k.transpose(0, 2, 1, 3)                                          # [B,N,S,T] @ [B,N,T,D] -> [B,N,S,D]
    dk = draw.transpose(0, 1, 3, 2) @ q.transpose(0, 2, 1, 3)                    # [B,N,T,S] @ [B,N,S,D] -> [B,N,T,D]
    return dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3)


def scale_scores_backward(raw, head_size, dscaled):
    """scaled = raw / sqrt(D):  draw = dscaled / sqrt(D). [B,N,S,T] -> [B,N,S,T]"""
    return dscaled * dscaled.dtype.type(1.0 / math.sqrt(float(head_size)))


def talking_heads_mix_backward(x, weight, dy):
    """y[b,m,s,t] = sum_n x[b,n,s,t] W[n,m]:
        dx[b,n,s,t] = sum_m dy[b,m,s,t] W[n,m]   (the same mix with W^T),
        dW[n,m] = sum_{b,s,t} x[b,n,s,t] dy[b,m,s,t]   (each head pair's correlation over all logits).
    [B,N,S,T] -> ([B,N,S,T], [N,N])"""
    B, N, S, T = x.shape
    x_rows, dy_rows = x.reshape(B, N, S * T), dy.reshape(B, N, S * T)          # views, no copies
    dx = (weight @ dy_rows).reshape(B, N, S, T)                                 # [N,N] @ [B,N,S*T] -> [B,N,S*T]
    dweight = (x_rows @ dy_rows.transpose(0, 2, 1)).sum(axis=0)                 # [B,N,S*T] @ [B,S*T,N] -> [N,N]
    return dx, dweight


def apply_attention_mask_backward(scores, mask_adder, dmasked):
    """masked = scores + adder (adder constant):  dscores = dmasked.  [B,N,S,T] -> [B,N,S,T]

    As automatic differentiation writes it, and as tf.GradientTape computes it: in float32,
    s + -1e9 rounds to -1e9, so on a row whose keys are all padding the forward no longer depends
    on s, yet the chain rule passes the (uniform) softmax's gradient through with factor 1. Other
    rows get zero there anyway, since their masked probabilities are exactly 0.
    """
    return dmasked


def softmax_backward(probs, dprobs):
    """p = softmax(x) over the last axis, written in its output p:
        dx = p * (dp - sum_t p*dp)   (the Jacobian diag(p) - p p^T applied to dp).
    [...,T] -> [...,T]"""
    return probs * (dprobs - (probs * dprobs).sum(axis=-1, keepdims=True))


def attention_context_backward(probs, v, dctx):
    """ctx[b,s,n,:] = sum_t P[b,n,s,t] v[b,t,n,:]:
        dP[b,n,s,t] = dctx[b,s,n,:]·v[b,t,n,:],  dv[b,t,n,:] = sum_s P[b,n,s,t] dctx[b,s,n,:].
    [B,S,N,D] -> ([B,N,S,T], [B,T,N,D])"""
    dctx_heads = dctx.transpose(0, 2, 1, 3)                                      # [B,N,S,D]
    dprobs = dctx_heads @ v.transpose(0, 2, 3, 1)                                # [B,N,S,D] @ [B,N,D,T] -> [B,N,S,T]
    dv = probs.transpose(0, 1, 3, 2) @ dctx_heads                                # [B,N,T,S] @ [B,N,S,D] -> [B,N,T,D]
    return dprobs, dv.transpose(0, 2, 1, 3)


def attention_output_backward(ctx, kernel, bias, dy):
    """y = ctx·Wo + bo with ctx viewed as [B,S,N*D]: dense_backward.
    [B,S,H] -> ([B,S,N,D], [N,D,H], [H])"""
    B, S, N, D = ctx.shape
    dctx, dkernel, dbias = dense_backward(ctx.reshape(B, S, N * D), kernel.reshape(N * D, -1), bias, dy)
    return dctx.reshape(B, S, N, D), dkernel.reshape(N, D, -1), dbias


# ---------------------------------------------------------------------------- heads

def tanh_backward(y, dy):
    """y = tanh(x), written in its output:  dx = dy * (1 - y^2). [...] -> [...]"""
    return dy * (y.dtype.type(1.0) - y * y)


def pooler_backward(sequence_output, kernel, bias, pooled, dpooled):
    """pooled = tanh(x[:,0]·Wp + bp) (its output `pooled` passed in): tanh_backward, dense_backward,
    and the [CLS] row of dx receives the result, every other row zero.
    [B,H] -> ([B,S,H], [H,H], [H])"""
    xp = array_module(sequence_output)
    dcls, dkernel, dbias = dense_backward(sequence_output[:, 0], kernel, bias, tanh_backward(pooled, dpooled))
    dx = xp.zeros_like(sequence_output)
    dx[:, 0] = dcls
    return dx, dkernel, dbias


def gather_positions_backward(sequence_output, positions, dgathered):
    """g[b,p] = x[b, positions[b,p]]: dx[b,s] = sum of dg[b,p] over the p with positions[b,p] = s
    (repeated positions, e.g. zero-padded ones, add up). [B,P,H] -> [B,S,H]"""
    xp = array_module(sequence_output)
    B, S, H = sequence_output.shape
    flat = (xp.arange(B)[:, None] * S + positions).reshape(-1)                  # [B*P] rows of [B*S,H]
    return scatter_add_rows(B * S, flat, dgathered.reshape(-1, H)).reshape(B, S, H)
