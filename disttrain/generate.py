"""Text generation from a byte-level GPT: sample a continuation of a prompt, token by token.

Each new byte is drawn from softmax(logits / temperature) over the model's last position, restricted
to the `top_k` most likely bytes when top_k > 0 (temperature 0 takes the most likely byte). The model
sees at most its last `block_size` bytes. The draws come from numpy's generator seeded with `seed`, so
a seed, model and prompt give the same text on every run and machine.
"""

from __future__ import annotations

import sys

import numpy as np

from .tensor import no_grad


def generate(model, prompt: bytes, tokens: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> bytes:
    """The `tokens` bytes that `model` (a GPT: ids (1, T) -> logits (1, T, vocab)) samples after
    `prompt` (at least one byte). The model runs in eval mode (no dropout) and is left in its mode."""
    prompt = bytes(prompt.encode("utf-8") if isinstance(prompt, str) else prompt)
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one byte")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
        raise ValueError(f"generate: tokens must be a non-negative integer, got {tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"generate: top_k must be a non-negative integer (0: no limit), got {top_k!r}")
    rng = np.random.default_rng(seed)
    context = list(prompt)
    block_size = getattr(model, "block_size", len(context) + tokens)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with no_grad():
            for _ in range(tokens):
                window = np.array([context[-block_size:]], dtype=np.int64)
                logits = np.asarray(model(window).data[0, -1], dtype=np.float64)
                context.append(next_token(logits, temperature, top_k, rng))
    finally:
        model.train(was_training)
    return bytes(context[len(prompt):])


def next_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id drawn from float64 `logits` (vocab,) with the given temperature and top-k."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    if 0 < top_k < len(scaled):
        cutoff = np.partition(scaled, len(scaled) - top_k)[len(scaled) - top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(probs) - 1))


def load_gpt(run_dir: str):
    """(model, checkpoint path): the GPT of the newest usable checkpoint of `run_dir` (a run directory,
    a checkpoint directory or one checkpoint), built from the config saved with it."""
    from . import models
    from .checkpoint import CheckpointError, read_model
    from .config import validate

    state, manifest, path = read_model(run_dir)
    saved = (manifest.get("extra") or {}).get("config") or {}
    if "model" not in saved:
        raise CheckpointError(f"{path}: the checkpoint records no [model] config to rebuild the model from")
    section = validate({"model": saved["model"]}, f"{path} (saved config)")["model"]
    if section["name"] != "gpt":
        raise ValueError(f"{path}: sampling needs a gpt model, this checkpoint holds model.name = {section['name']!r}")
    model = models.gpt(section, rng=np.random.default_rng(0))
    model.load_state_dict(state)
    return model, path


def sample_command(run_dir: str, prompt: str = "\n", tokens: int = 200, temperature: float = 0.8, top_k: int = 40,
                   seed: int = 0, out=None) -> str:
    """Load the newest checkpoint of `run_dir`, sample `tokens` bytes after `prompt`, print prompt and
    continuation (as UTF-8, a cut or invalid sequence shown as U+FFFD) to `out` (stdout); returns the text."""
    model, _ = load_gpt(run_dir)
    continuation = generate(model, prompt.encode("utf-8"), tokens, temperature, top_k, seed)
    text = prompt + continuation.decode("utf-8", errors="replace")
    print(text, file=out or sys.stdout, flush=True)
    return text
