"""The demo's text: the source files of the running Python's standard library, which every Python
installation has (no download). Files are split into training and held-out sets by file, from a seed,
so that no held-out character comes from a file the models trained on.

Characters are ASCII codes: anything else (rare in the standard library) becomes ``?``.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass

import torch

VOCAB = 128
UNKNOWN = ord("?")


@dataclass
class Corpus:
    train: torch.Tensor  # (N,) int64 character codes, the training files concatenated
    held_out: torch.Tensor  # (M,) likewise, the held-out files
    train_files: list[str]  # the files read, in order
    held_out_files: list[str]
    root: str


def standard_library_sources(root: str | None = None) -> list[str]:
    """The .py files of the standard library (not site-packages), sorted by path."""
    root = root or sysconfig.get_paths()["stdlib"]
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        found.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    return sorted(found)


def encode(text: str) -> torch.Tensor:
    codes = bytearray(c if c < VOCAB else UNKNOWN for c in text.encode("ascii", errors="replace"))
    return torch.frombuffer(codes, dtype=torch.uint8).to(torch.int64) if codes else torch.zeros(0, dtype=torch.int64)


def decode(codes) -> str:
    return "".join(chr(int(c)) for c in codes)


def load_corpus(seed: int, max_chars: int, held_out_fraction: float = 0.1, root: str | None = None) -> Corpus:
    """Shuffles the files with ``seed``, holds out every file of the first ``held_out_fraction`` of
    them, and reads files until each set has its share of ``max_chars`` characters."""
    files = standard_library_sources(root)
    if len(files) < 2:
        raise RuntimeError(f"rnnattn_ext.demo: found {len(files)} Python source file(s) under "
                           f"{root or sysconfig.get_paths()['stdlib']}; the demo needs at least 2")
    random.Random(seed).shuffle(files)
    split = max(1, int(len(files) * held_out_fraction))
    budgets = {"held_out": max(1, int(max_chars * held_out_fraction)), "train": max_chars}
    sets = {"held_out": files[:split], "train": files[split:]}
    texts, counts = {}, {}
    for name, members in sets.items():
        parts, total, used = [], 0, []
        for path in members:
            if total >= budgets[name]:
                break
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            parts.append(encode(text))
            total += parts[-1].numel()
            used.append(path)
        texts[name] = torch.cat(parts)[: budgets[name]] if parts else torch.zeros(0, dtype=torch.int64)
        counts[name] = used
    return Corpus(texts["train"], texts["held_out"], counts["train"], counts["held_out"],
                  root or sysconfig.get_paths()["stdlib"])


def batches(text: torch.Tensor, batch: int, steps: int, seed: int):
    """Endless (inputs, targets) pairs, each (batch, steps): windows at random offsets, from a
    generator of its own so that every model sees the same batches."""
    if text.numel() < steps + 2:
        raise ValueError(f"rnnattn_ext.demo: the training text has {text.numel()} characters, fewer than "
                         f"seq_len + 2 = {steps + 2}")
    generator = torch.Generator().manual_seed(seed)
    span = torch.arange(steps + 1)
    while True:
        starts = torch.randint(0, text.numel() - steps - 1, (batch,), generator=generator)
        windows = text[starts.unsqueeze(1) + span]
        yield windows[:, :-1], windows[:, 1:]


def evaluation_windows(text: torch.Tensor, steps: int, count: int) -> torch.Tensor:
    """Up to ``count`` disjoint windows of ``steps + 1`` characters, evenly spread over the text."""
    available = text.numel() // (steps + 1)
    if available == 0:
        raise ValueError(f"rnnattn_ext.demo: the held-out text has {text.numel()} characters, fewer than "
                         f"seq_len + 1 = {steps + 1}")
    count = min(count, available)
    stride = available // count
    starts = torch.arange(count) * stride * (steps + 1)
    return text[starts.unsqueeze(1) + torch.arange(steps + 1)]
