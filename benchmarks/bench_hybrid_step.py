"""Single-step latency of HybridBlock's streaming inference: one position at a time at batch 1, a
recurrent layer then causal windowed self-attention over the window's keys and values, on the same
device, against what a user writes today with torch.nn: the cell (``LSTMCell``, ``GRUCell``,
``RNNCell``) for the step, then the same attention over a cache of keys and values in torch
operations (one product each for the query, key and value, ``scaled_dot_product_attention``, the
output projection), same weights. Ours: ``block.stream(x_t, state)`` and ``block.streamer()``'s
``step(x_t)``, under ``torch.no_grad()``. The ratios are the torch.nn peer's time over ours.

    python benchmarks/bench_hybrid_step.py
    python benchmarks/bench_hybrid_step.py --shapes 1x256x256x256x64 --cells lstm --steps 32
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attention_step_main, interleaved_median_ms, results_markdown  # noqa: E402
from bench_step import stream_steps, streamer_steps  # noqa: E402

import rnnattn_ext  # noqa: E402

HEADS = 4
DEFAULT_SHAPES = [(1, 256, 256, 256, 64)]  # B, I, H, D (= 4 heads x head_dim, HybridBlock's default: H), window
CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn_tanh": torch.nn.RNNCell}


def torch_nn_steps(block, cell, xs) -> torch.Tensor:
    """The torch.nn peer over xs (T, B, I) from a zero state: the cell, then the attention. Returns the
    last step's output."""
    heads, head_dim, window = block.num_heads, block.head_dim, block.window
    with torch.no_grad():
        state, keys, values = None, None, None
        for x in xs:
            state = cell(x, state)
            y = state[0] if isinstance(state, tuple) else state
            batch = y.shape[0]

            def split(t):  # (B, D) -> (B, heads, 1, head_dim)
                return t.view(batch, heads, 1, head_dim)

            q, k, v = split(block.query(y)), split(block.key(y)), split(block.value(y))
            if keys is not None:
                k, v = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            context = F.scaled_dot_product_attention(q, k, v).reshape(batch, heads * head_dim)
            output = y + block.out(context)
            keep = k.shape[2] if window is None else min(k.shape[2], window - 1)
            keys, values = (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]) if keep else (None, None)
    return output


def bench_cell(cell, shape, device, dtype, steps, repeats, warmup):
    """One row: per-step times of the torch.nn peer, our stream and our streamer."""
    batch, input_size, hidden, width, window = shape
    torch.manual_seed(0)
    block = rnnattn_ext.HybridBlock(input_size, hidden, num_heads=HEADS, head_dim=width // HEADS, window=window,
                                    cell=cell).to(device=device, dtype=dtype).eval()
    torch_cell = CELLS[cell](input_size, hidden).to(device=device, dtype=dtype)
    torch_cell.load_state_dict({name[:-3]: p for name, p in block.recurrent.state_dict().items()})  # drop "_l0"
    xs = torch.randn(steps, batch, input_size, device=device, dtype=dtype)
    streamer = block.streamer()
    # Both compute the same block: the last step's outputs agree.
    torch.testing.assert_close(torch_nn_steps(block, torch_cell, xs), [streamer.step(x) for x in xs][-1])
    measured = interleaved_median_ms({
        "torch_nn": lambda: torch_nn_steps(block, torch_cell, xs),
        "stream": lambda: stream_steps(block, xs, torch.no_grad),
        "streamer": lambda: streamer_steps(streamer, xs, torch.no_grad),
    }, device, repeats, warmup)
    times = {label + "_us": ms * 1e3 / steps for label, ms in measured.items()}
    return {"cell": cell, "B": batch, "I": input_size, "H": hidden, "D": width, "heads": HEADS, "window": window,
            "steps": steps, **times, "stream_speedup": measured["torch_nn"] / measured["stream"],
            "streamer_speedup": measured["torch_nn"] / measured["streamer"]}


def progress_line(r) -> str:
    return (f"{r['cell']:8s} {r['B']}x{r['I']}x{r['H']} D{r['D']} w{r['window']}  torch.nn {r['torch_nn_us']:8.1f} us  "
            f"stream {r['stream_us']:8.1f} us ({r['stream_speedup']:.2f}x)  streamer {r['streamer_us']:8.1f} us "
            f"({r['streamer_speedup']:.2f}x)")


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×I×H, D (heads), w", "torch.nn cell + attention µs/step", "`stream` µs/step", "speed-up",
               "`streamer()` µs/step", "speed-up"]
    return results_markdown(info, device, dtype, columns, 2, [
        [r["cell"], f"{r['B']}×{r['I']}×{r['H']}, {r['D']} ({r['heads']}), {r['window']}", f"{r['torch_nn_us']:.1f}",
         f"{r['stream_us']:.1f}", f"{r['stream_speedup']:.2f}×", f"{r['streamer_us']:.1f}",
         f"{r['streamer_speedup']:.2f}×"] for r in rows])


def main(argv=None):
    attention_step_main(argv, __doc__, CELLS, DEFAULT_SHAPES, HEADS, "window", "1x256x256x256x64",
                        "consecutive steps per timed run", "hybrid_step", bench_cell, progress_line, markdown_table)

if __name__ == "__main__":
    main()
