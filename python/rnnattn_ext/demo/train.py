"""Training one character model: the same batches for every model (one seed), Adam, gradient
clipping, held-out bits per character at regular steps, checkpoints to resume from."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import data
from .models import LABELS, CharModel


@dataclass
class Config:
    steps: int = 1000
    batch: int = 32
    seq_len: int = 128
    embed: int = 64
    hidden: int = 256
    layers: int = 1
    heads: int = 4
    head_dim: int = 16
    window: int = 32
    lr: float = 3e-3
    clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 32
    final_eval_windows: int = 256
    max_chars: int = 4_000_000
    seed: int = 0


@dataclass
class History:
    """What a model's training left: per-step training loss, and held-out points
    (step, training seconds so far, bits per character)."""

    train_bpc: list[float] = field(default_factory=list)
    eval_points: list[tuple[int, float, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def bits_per_char(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)) / math.log(2)


@torch.no_grad()
def held_out_bpc(model: CharModel, windows: torch.Tensor, device: torch.device, batch: int) -> float:
    """Mean bits per character over held-out windows (each (seq_len + 1) characters: input and target)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1])
        total += float(bits_per_char(logits, chunk[:, 1:])) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def build_model(kind: str, config: Config, device: torch.device) -> CharModel:
    torch.manual_seed(config.seed)  # every kind starts from its own seeded initialisation
    model = CharModel(kind, data.VOCAB, config.embed, config.hidden, config.layers, config.heads, config.head_dim,
                      config.window)
    return model.to(device)


def checkpoint_path(folder: str, kind: str) -> str:
    return os.path.join(folder, "checkpoints", f"{kind}.pt")


def save_checkpoint(path: str, model: CharModel, optimizer, step: int, history: History, config: Config) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": asdict(history), "config": asdict(config)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed while saving leaves the previous checkpoint whole


def load_checkpoint(path: str, model: CharModel, optimizer, config: Config) -> tuple[int, History]:
    saved = torch.load(path, map_location=model.head.weight.device, weights_only=False)
    shape_keys = ("batch", "seq_len", "embed", "hidden", "layers", "heads", "head_dim", "window", "seed")
    different = {k: (saved["config"][k], getattr(config, k)) for k in shape_keys
                 if saved["config"][k] != getattr(config, k)}
    if different:
        raise ValueError(f"rnnattn_ext.demo: checkpoint {path} was trained with other settings "
                         f"(saved, now): {different}; use the same settings or another --out folder")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    history = History(**saved["history"])
    history.eval_points = [(int(step), float(seconds), float(bpc)) for step, seconds, bpc in history.eval_points]
    return saved["step"], history


def train(kind: str, config: Config, corpus: data.Corpus, device: torch.device, folder: str, resume: bool,
          progress: bool) -> tuple[CharModel, History]:
    """Trains (or resumes) one model to config.steps steps; returns it and its history."""
    from tqdm.auto import tqdm

    model = build_model(kind, config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    path = checkpoint_path(folder, kind)
    step, history = 0, History()
    if resume and os.path.exists(path):
        step, history = load_checkpoint(path, model, optimizer, config)
    eval_windows = data.evaluation_windows(corpus.held_out, config.seq_len, config.eval_windows)
    stream = data.batches(corpus.train, config.batch, config.seq_len, config.seed)
    for _ in range(step):  # the batches the checkpoint already trained on
        next(stream)
    tokens = config.batch * config.seq_len
    bar = tqdm(total=config.steps, initial=step, desc=f"{LABELS[kind]:21s}", unit="step", disable=not progress,
               dynamic_ncols=True)
    model.train()
    while step < config.steps:
        inputs, targets = next(stream)
        started = time.perf_counter()
        loss = bits_per_char(model(inputs.to(device)), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history.train_seconds += time.perf_counter() - started
        history.train_bpc.append(float(loss.detach()))
        step += 1
        postfix = {"train_bpc": f"{history.train_bpc[-1]:.3f}",
                   "tok_s": f"{step * tokens / max(history.train_seconds, 1e-9):,.0f}"}
        if step % config.eval_every == 0 or step == config.steps:
            bpc = held_out_bpc(model, eval_windows, device, config.batch)
            history.eval_points.append((step, history.train_seconds, bpc))
            save_checkpoint(path, model, optimizer, step, history, config)
            bar.set_postfix(postfix, held_out_bpc=f"{bpc:.3f}")
        elif step % 5 == 0:
            bar.set_postfix(postfix)
        bar.update(1)
    bar.close()
    return model, history
