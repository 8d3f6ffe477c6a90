"""Single-step latency of streaming inference: one time step at a time at batch 1, carrying the state,
as a real-time application runs a recurrent model. Ours is ``module.stream(x_t, state)``; the peer is
torch.nn's cell module (LSTMCell, GRUCell, RNNCell) with the same weights, on the same device.

Each timed run feeds ``--steps`` consecutive steps; the table gives the median per-step time and the
ratio torch.nn / ours (> 1: we are faster), under ``torch.no_grad()`` and under
``torch.inference_mode()`` (where autograd is skipped entirely, for both: the difference from
``no_grad`` is autograd's bookkeeping per call).

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --device cuda --shapes 1x256x256
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (check_common, common_parser, interleaved_median_ms, results_markdown,  # noqa: E402
                          machine_info, rows_of, write_results)

import rnnattn_ext  # noqa: E402

DEFAULT_SHAPES = [(1, 256, 256)]  # B, I, H
CELLS = {
    "lstm": (torch.nn.LSTMCell, rnnattn_ext.LSTM, {}),
    "gru": (torch.nn.GRUCell, rnnattn_ext.GRU, {}),
    "rnn_tanh": (torch.nn.RNNCell, rnnattn_ext.RNN, {"nonlinearity": "tanh"}),
}


def stream_steps(module, xs, grad_mode) -> None:
    """Streams xs (T, B, I) through module.stream one step at a time, carrying the state."""
    with grad_mode():
        state = None
        for t in range(xs.shape[0]):
            _, state = module.stream(xs[t : t + 1], state)


def bench_cell(cell, shape, device, dtype, steps, repeats, warmup):
    """One row: the per-step time of our streaming step and of torch.nn's cell, same weights."""
    cell_cls, our_cls, kwargs = CELLS[cell]
    batch, input_size, hidden = shape
    torch.manual_seed(0)
    ours = our_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype).eval()
    peer = cell_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # the cell's parameters have the names of layer 0 without the suffix
        for name, parameter in peer.named_parameters():
            parameter.copy_(getattr(ours, name + "_l0"))
    xs = torch.randn(steps, batch, input_size, device=device, dtype=dtype)

    def run_peer(grad_mode):
        with grad_mode():
            state = None
            for t in range(steps):
                state = peer(xs[t], state)

    times = {}
    for mode, grad_mode in (("", torch.no_grad), ("inference_", torch.inference_mode)):
        measured = interleaved_median_ms({"torch.nn": lambda: run_peer(grad_mode),
                                          "rnnattn_ext": lambda: stream_steps(ours, xs, grad_mode)}, device, repeats, warmup)
        times[mode + "torch_nn_us"] = measured["torch.nn"] * 1e3 / steps
        times[mode + "rnnattn_us"] = measured["rnnattn_ext"] * 1e3 / steps
        times[mode + "ratio"] = measured["torch.nn"] / measured["rnnattn_ext"]
    return {"cell": cell, "B": batch, "I": input_size, "H": hidden, "mode": "stream step", "steps": steps,
            "peer": cell_cls.__name__, **times}


def progress_line(r) -> str:
    """One row as the run prints it."""
    return (f"{r['cell']:9s} {r['B']}x{r['I']}x{r['H']:<5d} stream step  {r['peer']} {r['torch_nn_us']:8.1f} us  "
            f"ours {r['rnnattn_us']:8.1f} us  {r['ratio']:.2f}x  (inference_mode: {r['inference_torch_nn_us']:.1f} / "
            f"{r['inference_rnnattn_us']:.1f} us, {r['inference_ratio']:.2f}x)")


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×I×H", "torch.nn cell", "torch.nn µs/step", "rnnattn_ext `stream` µs/step", "speed-up",
               "inference_mode: torch.nn µs/step", "inference_mode: ours µs/step", "inference_mode: speed-up"]
    return results_markdown(info, device, dtype, columns, 3, [
        [r["cell"], f"{r['B']}×{r['I']}×{r['H']}", r["peer"], f"{r['torch_nn_us']:.1f}", f"{r['rnnattn_us']:.1f}",
         f"{r['ratio']:.2f}×", f"{r['inference_torch_nn_us']:.1f}", f"{r['inference_rnnattn_us']:.1f}",
         f"{r['inference_ratio']:.2f}×"] for r in rows])


def main(argv=None):
    parser = common_parser(__doc__, list(CELLS), ",".join(CELLS), "B×I×H list, e.g. 1x256x256", warmup=2)
    parser.add_argument("--steps", type=int, default=64, help="consecutive steps per timed run")
    args = parser.parse_args(argv)
    dtype, shapes, cells = check_common(parser, args, list(CELLS), DEFAULT_SHAPES)
    repeats = args.repeats or 15
    info = machine_info(args.device)
    rows = rows_of(cells, shapes, lambda cell, shape: bench_cell(cell, shape, args.device, dtype, args.steps, repeats,
                                                                  args.warmup), progress_line)
    write_results(args, "step", info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))


if __name__ == "__main__":
    main()
