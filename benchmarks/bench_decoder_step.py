"""Single-step latency of an attention decoder: the attention-augmented modules over an external
memory (an encoder's outputs), one time step at a time, each sequence of ``--steps`` steps over a
memory of its own (a new utterance), on the same device. Per step, with the memory's set-up shared
out over its sequence:

- the eager reference (``rnnattn_ext.reference.attention_layer`` one step per call, the
  hand-written PyTorch cell, which projects the memory's keys and values at every step);
- ``module.stream(x_t, state, memory=...)`` (the op, which also makes them at every call);
- a ``module.streamer(memory)`` made for each sequence (the weights copied, keys and values made once);
- one streamer for every sequence, ``reset(memory=...)`` at each one (only the memory copied).

The ratios are the reference's time over each of ours.

    python benchmarks/bench_decoder_step.py
    python benchmarks/bench_decoder_step.py --shapes 1x256x256x64x50 --cells lstm --steps 32
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import attention_step_main, interleaved_median_ms, results_markdown  # noqa: E402

import rnnattn_ext  # noqa: E402
from rnnattn_ext import reference  # noqa: E402

HEADS = 4
MEMORIES = 4  # sequences cycle through this many memories, so each one starts on another
DEFAULT_SHAPES = [(1, 256, 256, 64, 50)]  # B, I (= H = M, the memory width), H, D (= 4 heads x head_dim), S
CELLS = {"lstm": rnnattn_ext.AttnLSTM, "gru": rnnattn_ext.AttnGRU}
CONTENDERS = ("reference", "stream", "new_streamer", "reset_streamer")


def _sequences(memories):
    """The memory of each timed sequence, in turn."""
    turn = [0]

    def next_memory():
        turn[0] = (turn[0] + 1) % len(memories)
        return memories[turn[0]]
    return next_memory


def bench_cell(cell, shape, device, dtype, steps, repeats, warmup):
    """One row: per-step times of each contender over one sequence and its memory."""
    batch, input_size, hidden, width, positions = shape
    torch.manual_seed(0)
    module = CELLS[cell](input_size, hidden, num_heads=HEADS, head_dim=width // HEADS, memory_size=input_size)
    module = module.to(device=device, dtype=dtype).eval()
    xs = torch.randn(steps, batch, input_size, device=device, dtype=dtype)
    memories = [torch.randn(positions, batch, input_size, device=device, dtype=dtype) for _ in range(MEMORIES)]
    weights = module._attention_weights()[0]
    states = 2 if cell == "lstm" else 1

    def run_reference(memory):
        hx = [torch.zeros(batch, hidden, device=device, dtype=dtype) for _ in range(states)]
        for x in xs:
            _, hx, _, _ = reference.attention_layer(cell, x.unsqueeze(0), hx, *weights, num_heads=HEADS, memory=memory)

    def run_stream(memory):
        state = None
        for x in xs:
            _, state = module.stream(x.unsqueeze(0), state, memory=memory)

    def run_new_streamer(memory):
        streamer = module.streamer(memory)
        for x in xs:
            streamer.step(x)

    kept = module.streamer(memories[0])

    def run_reset_streamer(memory):
        kept.reset(memory=memory)
        for x in xs:
            kept.step(x)

    runs = dict(zip(CONTENDERS, (run_reference, run_stream, run_new_streamer, run_reset_streamer)))
    contenders = {}
    for label, run in runs.items():
        next_memory = _sequences(memories)
        contenders[label] = lambda run=run, next_memory=next_memory: run(next_memory())
    with torch.no_grad():
        measured = interleaved_median_ms(contenders, device, repeats, warmup)
    times = {label + "_us": ms * 1e3 / steps for label, ms in measured.items()}
    ratios = {label + "_speedup": measured["reference"] / measured[label] for label in CONTENDERS[1:]}
    return {"cell": cell, "B": batch, "I": input_size, "H": hidden, "D": width, "heads": HEADS, "S": positions,
            "M": input_size, "mode": "decoder step", "steps": steps, **times, **ratios}


def progress_line(r) -> str:
    return (f"{r['cell']:5s} {r['B']}x{r['I']}x{r['H']} D{r['D']} S{r['S']} decoder step  reference "
            f"{r['reference_us']:8.1f} us  stream {r['stream_us']:7.1f} us ({r['stream_speedup']:.2f}x)  "
            f"new streamer {r['new_streamer_us']:7.1f} us ({r['new_streamer_speedup']:.2f}x)  reset(memory) "
            f"{r['reset_streamer_us']:7.1f} us ({r['reset_streamer_speedup']:.2f}x)")


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×I×H, D (heads), S", "steps per sequence", "eager reference µs/step", "`stream` µs/step",
               "speed-up", "new `streamer(memory)` µs/step", "speed-up", "`reset(memory=...)` µs/step", "speed-up"]
    return results_markdown(info, device, dtype, columns, 3, [
        [r["cell"], f"{r['B']}×{r['I']}×{r['H']}, {r['D']} ({r['heads']}), {r['S']}", str(r["steps"]),
         f"{r['reference_us']:.1f}", f"{r['stream_us']:.1f}", f"{r['stream_speedup']:.2f}×",
         f"{r['new_streamer_us']:.1f}", f"{r['new_streamer_speedup']:.2f}×", f"{r['reset_streamer_us']:.1f}",
         f"{r['reset_streamer_speedup']:.2f}×"] for r in rows])


def main(argv=None):
    attention_step_main(argv, __doc__, CELLS, DEFAULT_SHAPES, HEADS, "S", "1x256x256x64x50",
                        "steps per sequence (one memory each)", "decoder_step", bench_cell, progress_line,
                        markdown_table)

if __name__ == "__main__":
    main()
