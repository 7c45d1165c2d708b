"""The PyTorch twin of disttrain's GPT (disttrain/transformer.py): same layers, same parameter names
and shapes, so a state dict of numpy arrays copies across one to one.

Pre-LayerNorm blocks (LN -> causal self-attention -> residual, LN -> 4x MLP with tanh-GELU -> residual),
learned position embeddings, a final LayerNorm and an output head tied to the token embedding when
`tie_embeddings`. Attention runs either through torch's fused `scaled_dot_product_attention(...,
is_causal=True)` ("fused") or written out as matmul, mask, softmax, matmul ("written"). Dropout sits
where disttrain's does: after the embeddings, the attention projection and the MLP.

Importing this module imports torch: import it only when torch is installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = ("fused", "written")


class CausalSelfAttention(nn.Module):
    """(B, T, C) -> (B, T, C): one qkv projection, `n_head` heads, causal softmax, output projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, attention: str):
        super().__init__()
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.attention = n_head, attention
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "fused":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        return self.dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    """(B, T, C) -> (B, T, C): Linear(C, 4C), tanh-GELU, Linear(4C, C)."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, attention: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, attention)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab), parameter for parameter the twin of disttrain's GPT."""

    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
                 dropout: float = 0.0, tie_embeddings: bool = True, attention: str = "fused"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, attention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.tie_embeddings = tie_embeddings
        if not tie_embeddings:
            self.head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.dropout(self.wte(idx) + self.wpe.weight[:T])
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x @ self.wte.weight.T if self.tie_embeddings else self.head(x)

    def load_numpy(self, state: dict) -> None:
        """Copy a disttrain state dict ({name: float32 array}) into the parameters; every name must match."""
        own = dict(self.named_parameters())
        if set(own) != set(state):
            raise ValueError(f"state names differ: only in torch {sorted(set(own) - set(state))}, "
                             f"only in the state {sorted(set(state) - set(own))}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(torch.from_numpy(np.ascontiguousarray(state[name])))

    def numpy_grads(self) -> dict:
        """{name: gradient as a float32 numpy array} after backward()."""
        return {name: p.grad.detach().numpy().copy() for name, p in self.named_parameters() if p.grad is not None}


def loss_fn(logits, targets):
    """Mean cross-entropy of (B, T, V) logits against (B, T) integer targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
