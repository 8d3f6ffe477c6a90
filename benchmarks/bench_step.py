"""Single-step latency of streaming inference: one time step at a time at batch 1, carrying the state,
as a real-time application runs a recurrent model. Ours is ``module.stream(x_t, state)`` and, one step
per call, ``module.streamer()``'s ``step(x_t)`` (the state kept inside, the weights checked once); the
peer is torch.nn's cell module (LSTMCell, GRUCell, RNNCell) with the same weights, on the same device.

Each timed run feeds ``--steps`` consecutive steps; the table gives the median per-step time and the
ratio torch.nn / ours (> 1: we are faster), under ``torch.no_grad()`` and under
``torch.inference_mode()`` (where autograd is skipped entirely, for both: the difference from
``no_grad`` is autograd's bookkeeping per call).

``--chunk N`` (N > 1) streams N steps per call instead, as an application that buffers a few frames
does: ours is ``module.stream(x[t:t+N], state)``, the peer torch.nn's layer module (LSTM, GRU, RNN)
on the same chunk with the state carried; times are still per step.

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --chunk 4
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
# cell -> (torch.nn's cell module, torch.nn's layer module, ours, keyword arguments)
CELLS = {
    "lstm": (torch.nn.LSTMCell, torch.nn.LSTM, rnnattn_ext.LSTM, {}),
    "gru": (torch.nn.GRUCell, torch.nn.GRU, rnnattn_ext.GRU, {}),
    "rnn_tanh": (torch.nn.RNNCell, torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "tanh"}),
}


def stream_steps(module, xs, grad_mode, chunk=1) -> None:
    """Streams xs (T, B, I) through module.stream `chunk` steps at a time, carrying the state."""
    with grad_mode():
        state = None
        for t in range(0, xs.shape[0], chunk):
            _, state = module.stream(xs[t : t + chunk], state)


def streamer_steps(streamer, xs, grad_mode) -> None:
    """Steps xs (T, B, I) through a streamer from a zero state."""
    with grad_mode():
        streamer.reset()
        for x in xs:
            streamer.step(x)


def bench_cell(cell, shape, device, dtype, steps, repeats, warmup, chunk=1):
    """One row: the per-step time of our streaming call and of torch.nn's (its cell for one step at
    a time, its layer for chunks), same weights; at one step per call also our streamer's (else
    its entries are None)."""
    cell_cls, layer_cls, our_cls, kwargs = CELLS[cell]
    batch, input_size, hidden = shape
    torch.manual_seed(0)
    ours = our_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype).eval()
    peer_cls = cell_cls if chunk == 1 else layer_cls
    peer = peer_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype).eval()
    suffix = "_l0" if chunk == 1 else ""  # the cell's parameters have the names of layer 0 without it
    with torch.no_grad():
        for name, parameter in peer.named_parameters():
            parameter.copy_(getattr(ours, name + suffix))
    xs = torch.randn(steps, batch, input_size, device=device, dtype=dtype)

    def run_peer(grad_mode):
        with grad_mode():
            state = None
            if chunk == 1:
                for t in range(steps):
                    state = peer(xs[t], state)
            else:
                for t in range(0, steps, chunk):
                    _, state = peer(xs[t : t + chunk], state)

    streamer = ours.streamer() if chunk == 1 else None
    times = {}
    for mode, grad_mode in (("", torch.no_grad), ("inference_", torch.inference_mode)):
        contenders = {"torch.nn": lambda: run_peer(grad_mode),
                      "rnnattn_ext": lambda: stream_steps(ours, xs, grad_mode, chunk)}
        if streamer is not None:
            contenders["streamer"] = lambda: streamer_steps(streamer, xs, grad_mode)
        measured = interleaved_median_ms(contenders, device, repeats, warmup)
        times[mode + "torch_nn_us"] = measured["torch.nn"] * 1e3 / steps
        times[mode + "rnnattn_us"] = measured["rnnattn_ext"] * 1e3 / steps
        times[mode + "ratio"] = measured["torch.nn"] / measured["rnnattn_ext"]
        times[mode + "streamer_us"] = measured["streamer"] * 1e3 / steps if streamer is not None else None
        times[mode + "streamer_ratio"] = measured["torch.nn"] / measured["streamer"] if streamer is not None else None
    return {"cell": cell, "B": batch, "I": input_size, "H": hidden, "mode": "stream step", "steps": steps,
            "chunk": chunk, "peer": peer_cls.__name__, **times}


def progress_line(r) -> str:
    """One row as the run prints it."""
    call = "stream step " if r["chunk"] == 1 else f"stream chunk of {r['chunk']}"
    streamer = "" if r["streamer_us"] is None else (
        f"  streamer {r['streamer_us']:8.1f} us  {r['streamer_ratio']:.2f}x")
    return (f"{r['cell']:9s} {r['B']}x{r['I']}x{r['H']:<5d} {call}  {r['peer']} {r['torch_nn_us']:8.1f} us  "
            f"ours {r['rnnattn_us']:8.1f} us  {r['ratio']:.2f}x{streamer}  (inference_mode: "
            f"{r['inference_torch_nn_us']:.1f} / {r['inference_rnnattn_us']:.1f} us, {r['inference_ratio']:.2f}x)")


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×I×H", "steps per call", "torch.nn module", "torch.nn µs/step", "rnnattn_ext `stream` µs/step",
               "speed-up", "`streamer()` µs/step", "speed-up", "inference_mode: torch.nn µs/step",
               "inference_mode: `stream` µs/step", "speed-up", "inference_mode: `streamer()` µs/step", "speed-up"]

    def optional(value, unit):
        return "—" if value is None else f"{value:.1f}" if unit == "us" else f"{value:.2f}×"

    return results_markdown(info, device, dtype, columns, 4, [
        [r["cell"], f"{r['B']}×{r['I']}×{r['H']}", str(r["chunk"]), r["peer"], f"{r['torch_nn_us']:.1f}",
         f"{r['rnnattn_us']:.1f}", f"{r['ratio']:.2f}×", optional(r["streamer_us"], "us"),
         optional(r["streamer_ratio"], "x"), f"{r['inference_torch_nn_us']:.1f}", f"{r['inference_rnnattn_us']:.1f}",
         f"{r['inference_ratio']:.2f}×", optional(r["inference_streamer_us"], "us"),
         optional(r["inference_streamer_ratio"], "x")] for r in rows])


def main(argv=None):
    parser = common_parser(__doc__, list(CELLS), ",".join(CELLS), "B×I×H list, e.g. 1x256x256", warmup=2)
    parser.add_argument("--steps", type=int, default=64, help="consecutive steps per timed run")
    parser.add_argument("--chunk", type=int, default=1, help="steps per call (1: torch.nn's cell is the peer, else "
                        "its layer; default output name step_<device>_<dtype>_chunk<N>)")
    args = parser.parse_args(argv)
    dtype, shapes, cells = check_common(parser, args, list(CELLS), DEFAULT_SHAPES)
    if not 1 <= args.chunk <= args.steps:
        parser.error(f"--chunk must be in [1, --steps = {args.steps}], got {args.chunk}")
    if args.chunk > 1 and args.name is None:
        args.name = f"step_{args.device}_{args.dtype}_chunk{args.chunk}"
    repeats = args.repeats or 15
    info = machine_info(args.device)
    rows = rows_of(cells, shapes, lambda cell, shape: bench_cell(cell, shape, args.device, dtype, args.steps, repeats,
                                                                  args.warmup, args.chunk), progress_line)
    write_results(args, "step", info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))


if __name__ == "__main__":
    main()
