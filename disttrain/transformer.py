"""A GPT: a decoder-only transformer language model over integer tokens.

Token ids (B, T) -> logits (B, T, vocab). Learned token and position embeddings, `n_layer` pre-LayerNorm
blocks (x + attention(LN(x)), then x + MLP(LN(x)) with a 4x wide tanh-GELU MLP), a final LayerNorm and
an output projection that is the token embedding itself when `tie_embeddings` (one Parameter used
twice: its gradient is the sum of both uses, and it is trained, synchronised and saved once). Dropout
(probability `dropout`) follows the embeddings, each attention output projection and each MLP.

Initial values: every Linear weight and both embeddings N(0, 0.02^2); the two projections that write
into the residual stream N(0, (0.02 / sqrt(2 n_layer))^2), so the stream's variance does not grow with
depth; biases 0; LayerNorm scales 1 and shifts 0.
"""

from __future__ import annotations

import math

import numpy as np

from . import nn, ops
from .tensor import DEFAULT_FLOAT, Tensor

INIT_STD = 0.02


def _normal(shape: tuple, std: float, rng) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(DEFAULT_FLOAT)


def _linear(in_features: int, out_features: int, std: float, rng, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias, rng=rng)
    layer.weight.data[...] = _normal((out_features, in_features), std, rng)
    return layer


class CausalSelfAttention(nn.Module):
    """(B, T, C) -> (B, T, C): one Linear(C, 3C) makes queries, keys and values for `n_head` heads;
    fused causal attention (ops.causal_self_attention); Linear(C, C) output projection; dropout."""

    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float, rng):
        self.n_head = n_head
        self.qkv = _linear(n_embd, 3 * n_embd, INIT_STD, rng)
        self.proj = _linear(n_embd, n_embd, INIT_STD / math.sqrt(2 * n_layer), rng)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(ops.causal_self_attention(self.qkv(x), self.n_head)))


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C): Linear(C, 4C), GELU (tanh approximation), Linear(4C, C), dropout."""

    def __init__(self, n_embd: int, n_layer: int, dropout: float, rng):
        self.fc = _linear(n_embd, 4 * n_embd, INIT_STD, rng)
        self.proj = _linear(4 * n_embd, n_embd, INIT_STD / math.sqrt(2 * n_layer), rng)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(ops.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float, rng):
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, n_layer, dropout, rng)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, n_layer, dropout, rng)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (B, T) (integers in 0..vocab-1, T <= block_size) -> logits (B, T, vocab), float32.

    Parameters are named wte.weight, wpe.weight, blocks.{i}.{ln1,attn.qkv,attn.proj,ln2,mlp.fc,mlp.proj}.
    {weight,bias}, ln_f.{weight,bias}, and head.weight when the embeddings are not tied.
    """

    def __init__(self, vocab: int = 256, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 block_size: int = 128, dropout: float = 0.0, tie_embeddings: bool = True, rng=None):
        check_gpt_sizes(vocab=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                        dropout=dropout)
        rng = rng or nn.default_rng()
        self.vocab, self.block_size, self.tie_embeddings = vocab, block_size, bool(tie_embeddings)
        self.wte = nn.Embedding(vocab, n_embd, rng=rng, std=INIT_STD)
        self.wpe = nn.Embedding(block_size, n_embd, rng=rng, std=INIT_STD)
        self.dropout = nn.Dropout(dropout)
        self.blocks = [Block(n_embd, n_head, n_layer, dropout, rng) for _ in range(n_layer)]
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = None if tie_embeddings else _linear(n_embd, vocab, INIT_STD, rng, bias=False)
        self._positions = np.arange(block_size)

    def forward(self, tokens):
        tokens = np.asarray(tokens.data if isinstance(tokens, Tensor) else tokens)
        if tokens.ndim != 2:
            raise ValueError(f"GPT: tokens must be (batch, time), got shape {tokens.shape}")
        if tokens.shape[1] > self.block_size:
            raise ValueError(f"GPT: sequence length {tokens.shape[1]} exceeds block_size {self.block_size}")
        x = self.wte(tokens) + self.wpe(self._positions[:tokens.shape[1]])
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return ops.linear(x, self.wte.weight if self.head is None else self.head.weight)


def check_gpt_sizes(vocab, n_layer, n_head, n_embd, block_size, dropout) -> None:
    """Raise ValueError naming the first size that is not allowed."""
    for name, value in (("vocab", vocab), ("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                        ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"GPT: {name} must be a positive integer, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"GPT: n_embd = {n_embd} must be divisible by n_head = {n_head} "
                         f"(each head gets n_embd / n_head features)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"GPT: dropout must be in [0, 1), got {dropout!r}")


def lm_loss(logits, targets) -> Tensor:
    """Mean next-token cross-entropy of logits (B, T, vocab) against integer targets (B, T), nats/token."""
    return ops.cross_entropy(logits, targets)
