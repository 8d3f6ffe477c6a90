"""HybridBlock against an independent one-query-at-a-time computation over torch.nn's recurrent layer;
its stream, streamer and PackedSequence input against one call over the padded sequence."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnattn_ext
from rnnattn_ext import _ops, reference

from conftest import device_params

TORCH_RECURRENT = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}


def expected_output(block, x, hx=None):
    kwargs = {"nonlinearity": block.cell[4:]} if block.cell.startswith("rnn_") else {}
    rec = block.recurrent
    theirs = TORCH_RECURRENT[block.cell](rec.input_size, rec.hidden_size, num_layers=rec.num_layers,
                                          bidirectional=rec.bidirectional, **kwargs).double()
    theirs.load_state_dict(rec.state_dict())
    y, hidden = theirs(x, hx)
    out = reference.causal_self_attention(
        y, block.query.weight, block.query.bias, block.key.weight, block.key.bias, block.value.weight,
        block.value.bias, block.out.weight, block.out.bias, block.num_heads, block.window)
    return out, hidden


@pytest.mark.parametrize("cell", list(TORCH_RECURRENT))
@pytest.mark.parametrize("num_heads,head_dim", [(1, None), (4, None), (2, 5)])
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_reference(cell, num_heads, head_dim, window, bidirectional):
    torch.manual_seed(0)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=num_heads, head_dim=head_dim, window=window, cell=cell,
                                    num_layers=2, bidirectional=bidirectional).double()
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    out, hidden = block(x)
    ref_out, ref_hidden = expected_output(block, x)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    for a, b in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                    ref_hidden if isinstance(ref_hidden, tuple) else (ref_hidden,)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    weight = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weight).sum(), [x])
    (ref_grad,) = torch.autograd.grad((ref_out * weight).sum(), [x])
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-8)


def test_window_one_attends_only_to_itself():
    torch.manual_seed(1)
    block = rnnattn_ext.HybridBlock(3, 6, num_heads=2, window=1).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = block(x)
    y, _ = block.recurrent(x)
    torch.testing.assert_close(out, y + block.out(block.value(y)), atol=1e-12, rtol=1e-12)


def test_batch_first_and_unbatched():
    torch.manual_seed(2)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=2, batch_first=True).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    out, _ = block(x)
    block.batch_first = False
    out_tm, _ = block(x.transpose(0, 1))
    torch.testing.assert_close(out, out_tm.transpose(0, 1))
    single, _ = block(x[0])  # unbatched (T, I)
    torch.testing.assert_close(single, out_tm[:, 0])


def test_gradcheck():
    torch.manual_seed(3)
    block = rnnattn_ext.HybridBlock(2, 4, num_heads=2, window=2, cell="gru").double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: block(inp)[0], (x,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads \\(3\\) must divide"):
        rnnattn_ext.HybridBlock(3, 8, num_heads=3)
    with pytest.raises(ValueError, match="window must be None or an int >= 1, got 0"):
        rnnattn_ext.HybridBlock(3, 8, window=0)
    with pytest.raises(ValueError, match="cell must be one of"):
        rnnattn_ext.HybridBlock(3, 8, cell="transformer")


def _chunked(block, x, sizes, dim):
    """block.stream over x's chunks of `sizes` along `dim`, carrying the state."""
    outputs, state = [], None
    for chunk in x.split(sizes, dim=dim):
        y, state = block.stream(chunk, state)
        outputs.append(y)
    return torch.cat(outputs, dim), state


@pytest.mark.parametrize("cell", list(TORCH_RECURRENT))
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "unbatched"])
@pytest.mark.parametrize("device", device_params())
def test_stream_chunks_equal_one_call(cell, window, layout, device):
    torch.manual_seed(5)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=window, cell=cell, num_layers=2,
                                    batch_first=layout == "batch_first").to(device=device, dtype=torch.float64)
    shape = {"time_major": (9, 2, 3), "batch_first": (2, 9, 3), "unbatched": (9, 3)}[layout]
    x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    dim = 1 if layout == "batch_first" else 0
    whole, hidden = block(x)
    chunked, state = _chunked(block, x, [3, 1, 4, 1], dim)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=1e-10)
    assert isinstance(state, rnnattn_ext.HybridState)
    for a, b in zip(state.hidden if isinstance(state.hidden, tuple) else (state.hidden,),
                    hidden if isinstance(hidden, tuple) else (hidden,)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # The carried keys and values: the window's most recent positions but one (every one without a window).
    kept = {None: 9, 1: 0, 3: 2}[window]
    if kept == 0:
        assert state.keys is None and state.values is None
    else:
        lead = () if layout == "unbatched" else (2,)
        assert state.keys.shape == state.values.shape == (*lead, 2, kept, 4)
    # Gradients flow through the carried state as through one call.
    probe = torch.randn_like(whole)
    leaves = [x, *block.parameters()]
    expected = torch.autograd.grad((whole * probe).sum(), leaves)
    got = torch.autograd.grad((chunked * probe).sum(), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_stream_one_step_at_a_time_in_float32():
    torch.manual_seed(6)
    block = rnnattn_ext.HybridBlock(4, 16, num_heads=4, window=5, cell="gru").eval()
    x = torch.randn(12, 3, 4)
    with torch.no_grad():
        whole, _ = block(x)
        chunked, _ = _chunked(block, x, [1] * 12, 0)
    torch.testing.assert_close(chunked, whole)


def test_stream_compiles_without_graph_breaks():
    torch.manual_seed(7)
    block = rnnattn_ext.HybridBlock(3, 4, num_heads=2, window=3, cell="lstm").eval()
    x = torch.randn(2, 1, 3)

    def two_chunks(x):
        first, state = block.stream(x)
        second, state = block.stream(x, state)
        return second, state.keys

    compiled = torch.compile(two_chunks, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x), two_chunks(x)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_stream_bad_arguments(grad_mode):
    # Without autograd a short chunk may take the C++ attention, which hands a bad state to the torch
    # operations: their errors explain it in both modes.
    with pytest.raises(ValueError, match="stream needs a unidirectional module"):
        rnnattn_ext.HybridBlock(3, 8, bidirectional=True).stream(torch.randn(2, 1, 3))
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=3)
    with grad_mode():
        with pytest.raises(TypeError, match="state must be None or a HybridState .*, got tuple"):
            block.stream(torch.randn(2, 1, 3), (None, None, None))
        _, state = block.stream(torch.randn(2, 1, 3))
        with pytest.raises(ValueError, match=r"LSTM: expected h_0 of size \(1, 4, 8\), got \(1, 1, 8\)"):
            block.stream(torch.randn(2, 4, 3), state)  # another batch
        with pytest.raises(ValueError, match=r"state.keys and state.values must have shape \(batch, num_heads, P, "
                                             r"head_dim\) = \(1, 2, 2, 4\) for this chunk, got \(1, 2, 2, 4\) and "
                                             r"\(1, 1, 2, 4\)"):
            block.stream(torch.randn(2, 1, 3), state._replace(values=state.values[:, :1]))
        with pytest.raises(ValueError, match="must both be tensors or both None"):
            block.stream(torch.randn(1, 1, 3), state._replace(values=None))
        with pytest.raises(TypeError, match=r"state.keys and state.values must have the dtype \(torch.float32\) and "
                                            r"device \(cpu\) of this chunk's keys, got torch.float64 on cpu and "
                                            r"torch.float32 on cpu"):
            block.stream(torch.randn(1, 1, 3), state._replace(keys=state.keys.double()))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("device", device_params())
def test_packed_sequence_in_and_out(batch_first, enforce_sorted, device):
    torch.manual_seed(8)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=2, batch_first=batch_first).to(device, torch.float64)
    lengths = torch.tensor([5, 5, 3, 1] if enforce_sorted else [3, 5, 1, 5])
    x = torch.randn(*((4, 5) if batch_first else (5, 4)), 3, dtype=torch.float64, device=device, requires_grad=True)
    hx = tuple(torch.randn(1, 4, 8, dtype=torch.float64, device=device) for _ in range(2))  # the caller's batch order
    expected, expected_hidden = block(x, hx, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    output, hidden = block(packed, hx)
    assert isinstance(output, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(output.batch_sizes, packed.batch_sizes)
    for a, b in ((output.sorted_indices, packed.sorted_indices), (output.unsorted_indices, packed.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    padded, got_lengths = pad_packed_sequence(output, batch_first=batch_first)
    assert torch.equal(got_lengths, lengths)
    torch.testing.assert_close(padded, expected, atol=0, rtol=0)
    for a, b in zip(hidden, expected_hidden):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(output.data.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)
    with pytest.raises(ValueError, match="lengths is for a tensor input; a PackedSequence carries its own"):
        block(packed, lengths=lengths)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("device", device_params())
def test_streamer_steps_give_the_numbers_of_one_call(cell, window, unbatched, device):
    torch.manual_seed(9)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=window, cell=cell, num_layers=2,
                                    batch_first=True).to(device=device, dtype=torch.float64)
    x = torch.randn(2, 7, 3, dtype=torch.float64, device=device)
    if unbatched:
        x = x[0]
    with torch.no_grad():
        whole, hidden = block(x)
    streamer = block.streamer()
    assert streamer.state is None
    frames = x.unbind(0 if unbatched else 1)
    got = torch.stack([streamer.step(frame) for frame in frames], 0 if unbatched else 1)
    torch.testing.assert_close(got, whole, atol=1e-12, rtol=1e-10)
    # Its state is stream's: each continues from the other's.
    with torch.no_grad():
        _, streamed = block.stream(x)
    state = streamer.state
    assert isinstance(state, rnnattn_ext.HybridState)
    for mine, theirs in ((state.keys, streamed.keys), (state.values, streamed.values)):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=1e-10)
    more = torch.randn(2, 3, 3, dtype=torch.float64, device=device)
    more = more[0] if unbatched else more
    with torch.no_grad():
        expected, _ = block.stream(more, streamed)
    fresh = block.streamer()
    fresh.reset(streamed)
    got = torch.stack([fresh.step(frame) for frame in more.unbind(0 if unbatched else 1)], 0 if unbatched else 1)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    streamer.reset()
    assert streamer.state is None
    torch.testing.assert_close(streamer.step(frames[0]), whole.select(0 if unbatched else 1, 0), atol=1e-12, rtol=1e-10)


def test_streamer_is_a_snapshot_and_refuses_what_it_cannot_do():
    torch.manual_seed(10)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=3)
    streamer = block.streamer()
    x = torch.randn(1, 3)
    with torch.no_grad():
        expected, _ = block(x.unsqueeze(0))
        block.out.weight.add_(1.0)  # after the streamer was made: it keeps its copy
    torch.testing.assert_close(streamer.step(x), expected[0])
    assert "HybridStreamer(num_heads=2, head_dim=4, window=3, positions kept=1" in repr(streamer)
    with pytest.raises(ValueError, match="streamer needs a unidirectional module"):
        rnnattn_ext.HybridBlock(3, 8, bidirectional=True).streamer()
    with pytest.raises(ValueError, match="a streamer runs inference only"):
        streamer.step(torch.randn(1, 3, requires_grad=True))
    with pytest.raises(TypeError, match="state must be None or a HybridState, got tuple"):
        streamer.reset((None, None, None))
    state = streamer.state
    with pytest.raises(ValueError, match=r"must have shape \(batch, num_heads, P, head_dim\) = \(1, 2, P, 4\) "
                                         r"\(without the batch for an unbatched state\), got \(1, 1, 1, 4\)"):
        streamer.reset(state._replace(keys=state.keys[:, :1], values=state.values[:, :1]))
    with pytest.raises(ValueError, match=r"holds 3 positions, more than the window - 1 = 2"):
        streamer.reset(state._replace(keys=state.keys.expand(1, 2, 3, 4), values=state.values.expand(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="both be tensors or both None"):
        streamer.reset(state._replace(keys=None))
    with pytest.raises(TypeError, match=r"must have the block's dtype \(torch.float32\) and device \(cpu\), got "
                                        r"torch.float64 on cpu and torch.float32 on cpu"):
        streamer.reset(state._replace(keys=state.keys.double()))
    with pytest.raises(TypeError, match=r"state.hidden must be the recurrent state .* got NoneType"):
        streamer.reset(state._replace(hidden=None))
    assert streamer.num_layers == 1 and streamer.input_size == 3


def test_a_streaming_step_exports():
    torch.manual_seed(11)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=4, cell="gru").eval()

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x, h, keys, values):
            y, state = self.block.stream(x, rnnattn_ext.HybridState(h, keys, values))
            return y, state.hidden, state.keys, state.values

    with torch.no_grad():
        _, state = block.stream(torch.randn(5, 2, 3))
        args = (torch.randn(1, 2, 3), state.hidden, state.keys, state.values)
        program = torch.export.export(Step(), args)
        for got, expected in zip(program.module()(*args), Step()(*args)):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("num_heads,head_dim,bias", [(4, 16, True), (3, 5, False)])
@pytest.mark.parametrize("batch", [1, 6])
def test_float32_cpu_streamer_steps_in_cpp(window, num_heads, head_dim, bias, batch):
    # A float32 block on the CPU runs its step's attention in C++ (HybridAttentionStep): against the
    # block's float64 twin over a sequence long enough to move the kept positions back to the front
    # of their buffers several times (window) or to grow them (no window: 64 positions at first), with
    # head_dims on the vector (16) and scalar (5) attention passes, split over threads (conftest sets
    # RNNATTN_CPU_MIN_BLOCK_WORK=1) and batch rows past the GEMM's register blocks.
    torch.manual_seed(12)
    block = rnnattn_ext.HybridBlock(6, 32, num_heads=num_heads, head_dim=head_dim, window=window, cell="gru",
                                    bias=bias).eval()
    twin = rnnattn_ext.HybridBlock(6, 32, num_heads=num_heads, head_dim=head_dim, window=window, cell="gru",
                                   bias=bias).double().eval()
    twin.load_state_dict(block.state_dict())
    steps = 150
    x = torch.randn(steps, batch, 6)
    with torch.no_grad():
        expected, _ = twin(x.double())
        _, streamed = block.stream(x[:100])
    streamer = block.streamer()
    assert streamer._kernel is not None
    got = torch.stack([streamer.step(frame) for frame in x])
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=1e-4)
    # Its state after 100 steps is stream's, and continues from it; a reset one starts over.
    streamer.reset()
    for frame in x[:100]:
        streamer.step(frame)
    state = streamer.state
    for mine, theirs in ((state.keys, streamed.keys), (state.values, streamed.values)):
        assert (mine is None) == (theirs is None) == (window == 1)
        if mine is not None:
            assert mine.is_contiguous()
            torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)
    fresh = block.streamer()
    fresh.reset(streamed)
    torch.testing.assert_close(torch.stack([fresh.step(frame) for frame in x[100:]]), expected[100:].float(),
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([streamer.step(frame) for frame in x[100:]]), expected[100:].float(),
                               atol=2e-5, rtol=1e-4)


def test_hybrid_attention_step_checks_its_arguments():
    # The C++ step reads raw memory: every argument is checked before it indexes.
    w_qkv, w_out = torch.randn(24, 10), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"qkv_weight must have shape \(24, any\), got \[12, 10\]"):
        _ops.HybridAttentionStep(w_qkv[:12], None, w_out, None, 2, 4)
    with pytest.raises(TypeError, match="out_weight must be a float32 CPU tensor, got Double"):
        _ops.HybridAttentionStep(w_qkv, None, w_out.double(), None, 2, 4)
    with pytest.raises(ValueError, match=r"out_bias must have shape \(10\), got \[8\]"):
        _ops.HybridAttentionStep(w_qkv, None, w_out, torch.zeros(8), 2, 4)
    with pytest.raises(ValueError, match="num_heads and head_dim must be positive, got 0 and 4"):
        _ops.HybridAttentionStep(w_qkv, None, w_out, None, 0, 4)
    step = _ops.HybridAttentionStep(w_qkv, torch.zeros(24), w_out, torch.zeros(10), 2, 4)
    y, keys, values = torch.randn(3, 10), torch.zeros(3, 4, 8), torch.zeros(3, 4, 8)
    assert step.step(y, keys, values, 1, 2).shape == (3, 10)
    with pytest.raises(ValueError, match=r"must lie in the cache's 4 positions, got first = 2, count = 2"):
        step.step(y, keys, values, 2, 2)
    with pytest.raises(ValueError, match="got first = -1"):
        step.step(y, keys, values, -1, 0)
    with pytest.raises(ValueError, match=r"keys must be a contiguous \(batch, capacity, num_heads \* head_dim\) = "
                                         r"\(3, capacity, 8\) tensor, got \[2, 4, 8\]"):
        step.step(y, keys[:2], values, 0, 0)
    with pytest.raises(ValueError, match=r"values must be .* got \[3, 4, 8\] \(not contiguous\)"):
        step.step(y, keys, values.transpose(0, 1).contiguous().transpose(0, 1), 0, 0)
    with pytest.raises(ValueError, match=r"values must have the shape of keys \[3, 4, 8\], got \[3, 5, 8\]"):
        step.step(y, keys, torch.zeros(3, 5, 8), 0, 0)
    with pytest.raises(ValueError, match=r"y must have shape \(any, 10\), got \[3, 9\]"):
        step.step(y[:, :9], keys, values, 0, 0)
    with pytest.raises(TypeError, match="keys must be a torch.Tensor, got list"):
        step.step(y, [0.0], values, 0, 0)


def _cpp_attention_calls(monkeypatch):
    """Records what each of HybridBlock.stream's calls of _C.hybrid_stream_attention returned (None:
    the torch operations took the chunk)."""
    results, original = [], _ops.hybrid_stream_attention

    def recording(*arguments):
        results.append(original(*arguments))
        return results[-1]

    monkeypatch.setattr(_ops, "hybrid_stream_attention", recording)
    return results


def _steps_by_torch_operations(block, frames, state, monkeypatch):
    """block.stream over frames, chunk by chunk, with the C++ attention turned off."""
    with monkeypatch.context() as patch:
        patch.setattr(_ops, "hybrid_stream_attention", lambda *arguments: None)
        outputs = []
        for frame in frames:
            y, state = block.stream(frame, state)
            outputs.append(y)
    return outputs, state


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("num_heads,head_dim,bias", [(4, 16, True), (3, 5, False)])
@pytest.mark.parametrize("batch,layout", [(1, "time_major"), (4, "time_major"), (3, "batch_first"), (1, "unbatched")])
@pytest.mark.parametrize("chunks", [[1] * 9, [2, 3, 4], [5, 4]], ids=["steps", "short", "long"])
def test_short_stream_chunks_attend_in_cpp(window, num_heads, head_dim, bias, batch, layout, chunks, monkeypatch):
    # A float32 CPU block streamed in chunks of up to 16 steps without autograd runs the chunk's
    # attention in C++ on its live weights (_C.hybrid_stream_attention, step by step): the numbers of
    # its torch operations chunk for chunk, and of one call over the whole sequence; each state
    # continues in either.
    torch.manual_seed(13)
    block = rnnattn_ext.HybridBlock(6, 24, num_heads=num_heads, head_dim=head_dim, window=window, cell="lstm",
                                    bias=bias, batch_first=layout == "batch_first").eval()
    steps = sum(chunks)
    shape = {"time_major": (steps, batch, 6), "batch_first": (batch, steps, 6), "unbatched": (steps, 6)}[layout]
    x = torch.randn(*shape)
    dim = 1 if layout == "batch_first" else 0
    frames = x.split(chunks, dim)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(_ops, "hybrid_stream_attention", lambda *arguments: None)  # one call, torch operations
        whole, _ = block(x)
    calls = _cpp_attention_calls(monkeypatch)
    with torch.no_grad():
        states, outputs, state = [], [], None
        for frame in frames:
            y, state = block.stream(frame, state)
            outputs.append(y)
            states.append(state)
        assert len(calls) == len(chunks) and all(result is not None for result in calls)
        torch.testing.assert_close(torch.cat(outputs, dim), whole, atol=2e-6, rtol=1e-5)
        expected_outputs, _ = _steps_by_torch_operations(block, frames, None, monkeypatch)
        kept = {None: steps, 1: 0, 3: 2}[window]
        for got, expected in zip(outputs, expected_outputs):
            torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
        for chunk, got in enumerate(states):
            _, expected = _steps_by_torch_operations(block, frames[: chunk + 1], None, monkeypatch)
            positions = min(sum(chunks[: chunk + 1]), kept)
            for mine, theirs in ((got.keys, expected.keys), (got.values, expected.values)):
                if positions == 0:
                    assert mine is None and theirs is None
                    continue
                lead = () if layout == "unbatched" else (batch,)
                assert mine.shape == theirs.shape == (*lead, num_heads, positions, head_dim)
                torch.testing.assert_close(mine, theirs, atol=2e-6, rtol=1e-5)
        # A state from the C++ attention continues through the torch operations (the rest, in grad
        # mode) and through a streamer, and a state is not changed by a chunk from it (beam search
        # branches from one state several times).
        middle_chunk = next(i for i in range(len(chunks)) if sum(chunks[: i + 1]) >= 2)
        done = sum(chunks[: middle_chunk + 1])
        middle = states[middle_chunk]
        before = [t.clone() for t in (middle.keys, middle.values) if t is not None]
        with torch.enable_grad():
            rest, _ = block.stream(x.narrow(dim, done, steps - done), middle)
        assert calls[-1] is None and rest.requires_grad
        torch.testing.assert_close(rest, whole.narrow(dim, done, steps - done), atol=2e-6, rtol=1e-5)
        again, _ = block.stream(frames[middle_chunk + 1], middle)
        torch.testing.assert_close(again, outputs[middle_chunk + 1], atol=0, rtol=0)
        for t, copy in zip([t for t in (middle.keys, middle.values) if t is not None], before):
            assert torch.equal(t, copy)
        if layout != "batch_first":
            streamer = block.streamer()
            streamer.reset(middle)
            torch.testing.assert_close(streamer.step(x.select(0, done)), whole.select(0, done), atol=2e-6,
                                       rtol=1e-5)


def test_short_chunk_stream_reads_the_live_weights(monkeypatch):
    # Unlike a streamer's snapshot, stream reads the weights at each call: an optimizer's in-place
    # step, a write through .data (which no version counter sees) and a replaced parameter all show.
    torch.manual_seed(14)
    block = rnnattn_ext.HybridBlock(5, 8, num_heads=2, window=4, cell="gru").eval()
    x = torch.randn(1, 2, 5)
    calls = _cpp_attention_calls(monkeypatch)

    def both_ways(state):
        with torch.no_grad():
            got, _ = block.stream(x, state)
        expected, _ = _steps_by_torch_operations(block, [x], state, monkeypatch)
        torch.testing.assert_close(got, expected[0], atol=2e-6, rtol=1e-5)
        return got

    with torch.no_grad():
        _, state = block.stream(x)
    first = both_ways(state)
    with torch.no_grad():
        block.value.weight.add_(0.5)
    second = both_ways(state)
    block.query.weight.data.mul_(-1.0)
    third = both_ways(state)
    block.out.weight = torch.nn.Parameter(block.out.weight.detach().t().contiguous().t())  # columns contiguous
    block.key.bias = None
    fourth = both_ways(state)
    assert not torch.equal(first, second) and not torch.equal(second, third) and not torch.equal(third, fourth)
    assert len(calls) == 5 and all(result is not None for result in calls)


def test_short_chunk_stream_past_the_window_attends_its_last_positions(monkeypatch):
    # A state holding more positions than window - 1 (made by a block without a window): each step of
    # the chunk attends the most recent window - 1 before it and its own, as the torch operations' mask
    # does.
    torch.manual_seed(15)
    wide = rnnattn_ext.HybridBlock(5, 8, num_heads=2, cell="rnn_tanh").eval()
    narrow = rnnattn_ext.HybridBlock(5, 8, num_heads=2, window=3, cell="rnn_tanh").eval()
    narrow.load_state_dict(wide.state_dict())
    x = torch.randn(7, 2, 5)
    calls = _cpp_attention_calls(monkeypatch)
    with torch.no_grad():
        _, state = wide.stream(x[:5])
        assert state.keys.shape[2] == 5
        got, kept = narrow.stream(x[5:], state)
    expected, expected_kept = _steps_by_torch_operations(narrow, [x[5:]], state, monkeypatch)
    assert calls[-1] is not None
    torch.testing.assert_close(got, expected[0], atol=2e-6, rtol=1e-5)
    assert kept.keys.shape == expected_kept.keys.shape == (2, 2, 2, 4)
    torch.testing.assert_close(kept.keys, expected_kept.keys, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(kept.values, expected_kept.values, atol=2e-6, rtol=1e-5)


def test_short_chunk_stream_leaves_to_torch_operations_what_cpp_cannot_do(monkeypatch):
    # Autograd, more than four batch rows or 16 steps, another dtype, autocast and a __torch_dispatch__
    # mode (which must see the operations) all take the torch operations.
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(16)
    block = rnnattn_ext.HybridBlock(5, 8, num_heads=2, window=4, cell="lstm")
    calls = _cpp_attention_calls(monkeypatch)
    x = torch.randn(1, 2, 5)

    y, state = block.stream(x)  # parameters require grad, grad mode on
    y.sum().backward()
    assert block.query.weight.grad is not None and calls[-1] is None
    with torch.no_grad():
        block.stream(torch.randn(1, 5, 5))
        assert calls[-1] is None
        block.stream(torch.randn(17, 2, 5))
        assert calls == [None, None, None]
        block.double().stream(x.double())
        assert calls[-1] is None
        block.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block.stream(x)
        assert calls[-1] is None

        class Seen(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.names = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.names.append(str(func))
                return func(*args, **(kwargs or {}))

        with Seen() as seen:
            block.stream(x)
        assert calls[-1] is None and any("scaled_dot_product" in name for name in seen.names)
        block.stream(x, state)
        assert calls[-1] is not None


def test_short_chunk_stream_runs_the_projections_when_they_do_more_than_their_weights(monkeypatch):
    # A hook on a projection (or on every module), or a projection replaced by a module of another
    # kind (as an adapter library does), must run: the torch operations take the step.
    class Adapted(torch.nn.Linear):
        def forward(self, input):
            return super().forward(input) + 1.0

    torch.manual_seed(17)
    block = rnnattn_ext.HybridBlock(5, 8, num_heads=2, window=4, cell="gru").eval()
    x = torch.randn(1, 2, 5)
    calls = _cpp_attention_calls(monkeypatch)
    with torch.no_grad():
        plain, _ = block.stream(x)
        assert len(calls) == 1 and calls[-1] is not None
        handle = block.value.register_forward_hook(lambda module, args, output: output * 2.0)
        hooked, _ = block.stream(x)
        handle.remove()
        assert not torch.allclose(hooked, plain)
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
        block.stream(x)
        handle.remove()
        adapted = Adapted(8, 8)
        adapted.load_state_dict(block.out.state_dict())
        block.out = adapted
        shifted, _ = block.stream(x)
        torch.testing.assert_close(shifted, plain + 1.0)
        assert len(calls) == 1  # none of the three reached the C++ step


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "unbatched", "lengths", "packed", "bidirectional"])
def test_short_sequence_forward_attends_in_cpp(window, layout, monkeypatch):
    # forward over a short sequence of a few rows without autograd takes the same C++ attention (from
    # no past positions): the torch operations' numbers, lengths, PackedSequences and two directions
    # (the attention over both side by side) included.
    torch.manual_seed(18)
    block = rnnattn_ext.HybridBlock(5, 12, num_heads=3, window=window, cell="gru", batch_first=layout == "batch_first",
                                    bidirectional=layout == "bidirectional", num_layers=2).eval()
    x = {"batch_first": torch.randn(3, 7, 5), "unbatched": torch.randn(7, 5)}.get(layout, torch.randn(7, 3, 5))
    arguments = {"lengths": torch.tensor([7, 2, 5])} if layout == "lengths" else {}
    if layout == "packed":
        x = pack_padded_sequence(x, torch.tensor([7, 2, 5]), enforce_sorted=False)
    calls = _cpp_attention_calls(monkeypatch)
    with torch.no_grad():
        got, got_hidden = block(x, **arguments)
        assert len(calls) == 1 and calls[0] is not None
        with monkeypatch.context() as patch:
            patch.setattr(_ops, "hybrid_stream_attention", lambda *arguments: None)
            expected, expected_hidden = block(x, **arguments)
    if layout == "packed":
        got, expected = got.data, expected.data
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got_hidden, expected_hidden, atol=0, rtol=0)
    if layout == "lengths":
        assert torch.count_nonzero(got[5:, 2]) == 0 and torch.count_nonzero(got[2:, 1]) == 0
