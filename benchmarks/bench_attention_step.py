"""Single-step latency of the attention-augmented modules' streaming inference: one time step at a
time at batch 1 (``module.stream(x_t, state)``, the state carrying the self memory's recent slots),
against our plain module of the same size streaming the same steps, on the same device; and the same
for each module's ``streamer()`` (its ``step(x_t)``).

There is no torch.nn peer; the table gives the per-step times and their ratio attention / plain
(what the attention costs a streaming step), ``stream`` under ``torch.no_grad()`` and
``torch.inference_mode()``, the streamers under ``torch.no_grad()``.

    python benchmarks/bench_attention_step.py
    python benchmarks/bench_attention_step.py --shapes 1x256x256x64x64 --cells lstm
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attention_step_main, interleaved_median_ms, results_markdown  # noqa: E402
from bench_step import stream_steps, streamer_steps  # noqa: E402

import rnnattn_ext  # noqa: E402

HEADS = 4
DEFAULT_SHAPES = [(1, 256, 256, 64, 64)]  # B, I, H, D (= 4 heads x head_dim), window
CELLS = {
    "lstm": (rnnattn_ext.AttnLSTM, rnnattn_ext.LSTM),
    "gru": (rnnattn_ext.AttnGRU, rnnattn_ext.GRU),
}


def bench_cell(cell, shape, device, dtype, steps, repeats, warmup):
    """One row: per-step times of the attention module's stream and of the plain module's."""
    attn_cls, plain_cls = CELLS[cell]
    batch, input_size, hidden, width, window = shape
    torch.manual_seed(0)
    attn = attn_cls(input_size, hidden, num_heads=HEADS, head_dim=width // HEADS, window=window)
    plain = plain_cls(input_size, hidden)
    attn, plain = (m.to(device=device, dtype=dtype).eval() for m in (attn, plain))
    xs = torch.randn(steps, batch, input_size, device=device, dtype=dtype)

    attn_streamer, plain_streamer = attn.streamer(), plain.streamer()
    times = {}
    for mode, grad_mode in (("", torch.no_grad), ("inference_", torch.inference_mode)):
        contenders = {"attention": lambda: stream_steps(attn, xs, grad_mode),
                      "plain": lambda: stream_steps(plain, xs, grad_mode)}
        if not mode:
            contenders["attention_streamer"] = lambda: streamer_steps(attn_streamer, xs, grad_mode)
            contenders["plain_streamer"] = lambda: streamer_steps(plain_streamer, xs, grad_mode)
        measured = interleaved_median_ms(contenders, device, repeats, warmup)
        for label, ms in measured.items():
            times[mode + label + "_us"] = ms * 1e3 / steps
        times[mode + "cost_vs_plain"] = measured["attention"] / measured["plain"]
    times["streamer_cost_vs_plain"] = times["attention_streamer_us"] / times["plain_streamer_us"]
    return {"cell": cell, "B": batch, "I": input_size, "H": hidden, "D": width, "heads": HEADS, "window": window,
            "mode": "stream step", "steps": steps, **times}


def progress_line(r) -> str:
    return (f"{r['cell']:5s} {r['B']}x{r['I']}x{r['H']} D{r['D']} w{r['window']} stream step  attention "
            f"{r['attention_us']:8.1f} us  plain {r['plain_us']:8.1f} us  {r['cost_vs_plain']:.2f}x plain  "
            f"(inference_mode: {r['inference_attention_us']:.1f} / {r['inference_plain_us']:.1f} us, "
            f"{r['inference_cost_vs_plain']:.2f}x)  streamers {r['attention_streamer_us']:.1f} / "
            f"{r['plain_streamer_us']:.1f} us, {r['streamer_cost_vs_plain']:.2f}x")


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×I×H, D (heads), w", "attention `stream` µs/step", "plain `stream` µs/step",
               "attention / plain", "inference_mode: attention µs/step", "inference_mode: plain µs/step",
               "inference_mode: attention / plain", "attention `streamer()` µs/step", "plain `streamer()` µs/step",
               "attention / plain"]
    return results_markdown(info, device, dtype, columns, 2, [
        [r["cell"], f"{r['B']}×{r['I']}×{r['H']}, {r['D']} ({r['heads']}), {r['window']}", f"{r['attention_us']:.1f}",
         f"{r['plain_us']:.1f}", f"{r['cost_vs_plain']:.2f}×", f"{r['inference_attention_us']:.1f}",
         f"{r['inference_plain_us']:.1f}", f"{r['inference_cost_vs_plain']:.2f}×", f"{r['attention_streamer_us']:.1f}",
         f"{r['plain_streamer_us']:.1f}", f"{r['streamer_cost_vs_plain']:.2f}×"] for r in rows])


def main(argv=None):
    attention_step_main(argv, __doc__, CELLS, DEFAULT_SHAPES, HEADS, "window", "1x256x256x64x64",
                        "consecutive steps per timed run", "attention_step", bench_cell, progress_line,
                        markdown_table)

if __name__ == "__main__":
    main()
