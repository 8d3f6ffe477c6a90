"""module.streamer(): streaming inference one step per call, the state kept inside. Each step gives
the numbers of module.stream over that step (bit for bit in float32 on the CPU, but for the self
memory's carried slots, equal to rounding), the state is what stream returns (the attention modules' AttentionState with the carried slots), the weights and an
external memory are a snapshot, and bad input gets errors that name it."""

import threading
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rnnattn_ext

from conftest import device_params

MODULES = [
    (rnnattn_ext.LSTM, {}),
    (rnnattn_ext.GRU, {}),
    (rnnattn_ext.RNN, {"nonlinearity": "tanh"}),
    (rnnattn_ext.RNN, {"nonlinearity": "relu"}),
    (rnnattn_ext.LSTM, {"num_layers": 3, "proj_size": 4}),
    (rnnattn_ext.GRU, {"num_layers": 2, "bias": False}),
    (rnnattn_ext.LSTM, {"num_layers": 2, "batch_first": True, "dropout": 0.5}),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(MODULES)]


def _states(state):
    """A module's hx (or a streamer's state) as a tuple of tensors."""
    return state if isinstance(state, tuple) else (state,)


def _stream_steps(module, xs, state=None, **memory):
    """module.stream one step at a time over xs (T, B, I): the outputs (T, B, width) and the state."""
    outputs = []
    for x in xs:
        step = x.unsqueeze(1) if module.batch_first else x.unsqueeze(0)
        y, state = module.stream(step, state, **memory)
        outputs.append(y.squeeze(1 if module.batch_first else 0))
    return torch.stack(outputs), state


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,extra", MODULES, ids=IDS)
def test_steps_give_the_numbers_of_stream(cls, extra, dtype, device):
    torch.manual_seed(31)
    module = cls(5, 7, **extra).to(device=device, dtype=dtype).eval()
    xs = torch.randn(6, 3, 5, device=device, dtype=dtype)
    streamer = module.streamer()
    assert streamer.state is None and streamer.num_layers == module.num_layers and streamer.input_size == 5
    got = torch.stack([streamer.step(x) for x in xs])
    expected, state = _stream_steps(module, xs)
    with torch.no_grad():
        whole, whole_state = module(xs.transpose(0, 1) if module.batch_first else xs)
    whole = whole.transpose(0, 1) if module.batch_first else whole
    # float32: every product is our kernel's, bit for bit; float64's go through ATen's BLAS, whose
    # last bit depends on the operands' alignment (a state's offset in the stacked hx).
    exact = dtype == torch.float32 and device == "cpu"
    tolerance = {"atol": 0, "rtol": 0} if exact else {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got, whole, **({"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}))
    assert len(_states(streamer.state)) == len(_states(state))
    for mine, theirs in zip(_states(streamer.state), _states(state)):
        assert mine.shape == theirs.shape and mine.dtype == dtype and mine.device.type == device
        torch.testing.assert_close(mine, theirs, **tolerance)
    assert not got.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [7, 40, 70])
@pytest.mark.parametrize("cls", [rnnattn_ext.LSTM, rnnattn_ext.GRU, rnnattn_ext.RNN], ids=["LSTM", "GRU", "RNN"])
def test_batch_one_steps_read_the_weights_either_way_with_the_same_numbers(cls, hidden, dtype):
    """A one-step call at batch 1 reads its weights' rows last first every other call (so that a
    step starts with the rows the step before read last, still in cache; a bfloat16 or float16
    module's one-step call reads them in place in its dtype): the same step repeated gives the same
    bits whichever way it read them, a streamer's steps those of stream, and both the numbers of
    torch.nn's cell. Hidden 70 makes two blocks of units (conftest's bound) of 32 and 38 units."""
    torch.manual_seed(5)
    module = cls(6, hidden).to(dtype).eval()
    xs = torch.randn(5, 1, 6, dtype=dtype)
    with torch.no_grad():
        _, start = module.stream(xs[:1], None)
        repeated = [module.stream(xs[1:2], start) for _ in range(3)]
    for y, state in repeated[1:]:
        assert torch.equal(y, repeated[0][0])
        assert all(torch.equal(a, b) for a, b in zip(_states(state), _states(repeated[0][1])))
    streamer = module.streamer()
    got = torch.stack([streamer.step(x) for x in xs])
    expected, _ = _stream_steps(module, xs)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # torch.nn's cell in float64 with the same weights, step by step
    cell_cls = {rnnattn_ext.LSTM: torch.nn.LSTMCell, rnnattn_ext.GRU: torch.nn.GRUCell,
                rnnattn_ext.RNN: torch.nn.RNNCell}[cls]
    cell = cell_cls(6, hidden).double()
    with torch.no_grad():
        for name, parameter in cell.named_parameters():
            parameter.copy_(getattr(module, name + "_l0").double())
        state, reference = None, []
        for x in xs.double():
            state = cell(x, state)
            reference.append(state[0] if isinstance(state, tuple) else state)
    tolerance = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(expected.double(), torch.stack(reference), **tolerance)


@pytest.mark.parametrize("sizes", [(5, 7), (20, 24)], ids=["5-7", "20-24"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [rnnattn_ext.LSTM, rnnattn_ext.GRU, rnnattn_ext.RNN], ids=["LSTM", "GRU", "RNN"])
def test_reduced_precision_on_the_cpu_rounds_as_the_module(cls, dtype, sizes):
    """A streamer computes with float32 copies of the weights; a bfloat16 or float16 module's one-step
    call reads its 16-bit weights in place (widened as read): bit for bit the same, whole vectors of 8
    and tails alike."""
    torch.manual_seed(32)
    input_size, hidden = sizes
    module = cls(input_size, hidden, num_layers=2).to(dtype)
    xs = torch.randn(5, 2, input_size).to(dtype)
    streamer = module.streamer()
    got = torch.stack([streamer.step(x) for x in xs])
    expected, state = _stream_steps(module, xs)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    for mine, theirs in zip(_states(streamer.state), _states(state)):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_unbatched_step_is_batch_one():
    torch.manual_seed(33)
    module = rnnattn_ext.GRU(4, 6)
    xs = torch.randn(5, 4)
    streamer, batched = module.streamer(), module.streamer()
    for x in xs:
        y = streamer.step(x)
        assert y.shape == (6,)
        torch.testing.assert_close(y, batched.step(x.unsqueeze(0)).squeeze(0), atol=0, rtol=0)
    # The state reads as stream's after unbatched input: (num_layers, width).
    assert streamer.state.shape == (1, 6) and batched.state.shape == (1, 1, 6)
    assert "state=unbatched" in repr(streamer) and "state=batch 1" in repr(batched)
    torch.testing.assert_close(streamer.state, batched.state.squeeze(1), atol=0, rtol=0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["columns", "transposed", "offset", "expanded", "unbatched-strided"])
def test_inputs_of_any_layout_give_the_numbers_of_their_contiguous_copy(layout, device):
    # A step reads its input through the input's strides: a slice, a transpose, rows past a storage
    # offset, an expanded row and a strided vector give what their contiguous copies give.
    torch.manual_seed(35)
    module = rnnattn_ext.LSTM(4, 6, num_layers=2).to(device)
    xs = torch.randn(5, 3, 4, device=device)
    wide = torch.zeros(5, 3, 12, device=device)
    wide[..., ::3] = xs
    padded = torch.zeros(5, 4, 4, device=device)
    padded[:, 1:] = xs
    transposed = xs.transpose(1, 2).contiguous()
    inputs = {
        "columns": [wide[t, :, ::3] for t in range(5)],  # (3, 4), strides (12, 3)
        "transposed": [transposed[t].t() for t in range(5)],  # strides (1, 3)
        "offset": [padded[t, 1:] for t in range(5)],  # contiguous, past a storage offset
        "expanded": [xs[t, :1].expand(3, 4) for t in range(5)],  # strides (0, 1)
        "unbatched-strided": [wide[t, 0, ::3] for t in range(5)],  # (4,), stride 3
    }[layout]
    strided, packed = module.streamer(), module.streamer()
    for x in inputs:
        assert not x.is_contiguous() or x.storage_offset() > 0
        torch.testing.assert_close(strided.step(x), packed.step(x.contiguous()), atol=0, rtol=0)
    for mine, theirs in zip(_states(strided.state), _states(packed.state)):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("cls,extra", [(rnnattn_ext.LSTM, {"num_layers": 2}), (rnnattn_ext.GRU, {}),
                                       (rnnattn_ext.AttnLSTM, {"num_heads": 2, "window": 3}),
                                       (rnnattn_ext.AttnGRU, {"num_heads": 2, "memory_size": 5})],
                         ids=["LSTM", "GRU", "AttnLSTM-self", "AttnGRU-external"])
def test_unbatched_states_go_between_stream_and_a_streamer(cls, extra):
    gen = torch.Generator().manual_seed(34)
    torch.manual_seed(34)
    module = cls(3, 4, **extra).eval()
    memory = {"memory": torch.randn(6, 5, generator=gen)} if getattr(module, "memory_size", None) else {}
    xs = torch.randn(6, 3, generator=gen)
    with torch.no_grad():
        whole, _ = module(xs, **memory)
        _, state = module.stream(xs[:2], **memory)
    # stream's unbatched state into a streamer, and the streamer's back into stream.
    streamer = module.streamer(**memory)
    streamer.reset(state)
    got = [streamer.step(x) for x in xs[2:4]]
    with torch.no_grad():
        rest, _ = module.stream(xs[4:], streamer.state, **memory)
    torch.testing.assert_close(torch.cat([torch.stack(got), rest]), whole[2:])
    # A batched step after an unbatched state is batch 1; the state then reads batched.
    streamer.reset(state)
    streamer.step(xs[2].unsqueeze(0))
    h = streamer.state.h if isinstance(streamer.state, rnnattn_ext.AttentionState) else streamer.state
    assert (h[0] if isinstance(h, tuple) else h).dim() == 3


def test_reset_starts_from_zeros_or_the_given_state():
    torch.manual_seed(34)
    module = rnnattn_ext.LSTM(4, 6, num_layers=2)
    xs = torch.randn(4, 3, 4)
    hx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6))
    streamer = module.streamer()
    first = torch.stack([streamer.step(x) for x in xs])
    streamer.reset()
    assert streamer.state is None
    torch.testing.assert_close(torch.stack([streamer.step(x) for x in xs]), first, atol=0, rtol=0)
    streamer.reset(hx)
    expected, state = _stream_steps(module, xs, hx)
    torch.testing.assert_close(torch.stack([streamer.step(x) for x in xs]), expected, atol=0, rtol=0)
    # The state is copied in and out: changing either tensor afterwards changes nothing inside.
    hx[0].zero_()
    for mine, theirs in zip(streamer.state, state):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    streamer.state[0].zero_()
    torch.testing.assert_close(streamer.state[0], state[0], atol=0, rtol=0)


def test_a_streamer_keeps_the_weights_it_was_made_with():
    torch.manual_seed(35)
    module = rnnattn_ext.RNN(4, 5)
    x = torch.randn(2, 4)
    streamer = module.streamer()
    before = module.streamer().step(x)
    with torch.no_grad():
        module.weight_hh_l0.mul_(2)
        module.weight_ih_l0.data = torch.randn(5, 4)
    torch.testing.assert_close(streamer.step(x), before, atol=0, rtol=0)
    after = module.streamer().step(x)
    torch.testing.assert_close(after, _stream_steps(module, x.unsqueeze(0))[0][0], atol=0, rtol=0)
    assert not torch.equal(after, before)
    module.double()  # the module's new dtype is not the streamer's: it still takes float32
    assert streamer.step(x).dtype == torch.float32


def test_streamers_in_threads_keep_their_own_state():
    torch.manual_seed(36)
    module = rnnattn_ext.LSTM(8, 16)
    sequences = [torch.randn(20, 2, 8) for _ in range(3)]
    expected = [_stream_steps(module, xs)[0] for xs in sequences]
    results = [None] * len(sequences)

    def run(i):
        streamer = module.streamer()
        results[i] = torch.stack([streamer.step(x) for x in sequences[i]])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sequences))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_steps_inside_and_outside_inference_mode():
    torch.manual_seed(38)
    module = rnnattn_ext.AttnGRU(3, 4, num_heads=2, window=3)
    xs = torch.randn(6, 2, 3)
    streamer = module.streamer()
    got = []
    for i, x in enumerate(xs):  # the state made under inference_mode serves steps outside it, and back
        if i % 2:
            got.append(streamer.step(x))
        else:
            with torch.inference_mode():
                got.append(streamer.step(x).clone())
    with torch.no_grad():
        expected, _ = _stream_steps(module, xs)
    torch.testing.assert_close(torch.stack(got), expected)  # carried slots: equal to rounding
    assert not any(t.is_inference() for t in (streamer.state.h, *streamer.state.keys))
    # The state's tensors are fresh: changing them changes nothing inside.
    keys = streamer.state.keys[0]
    streamer.state.keys[0].zero_()
    torch.testing.assert_close(streamer.state.keys[0], keys, atol=0, rtol=0)


def test_repr_names_the_configuration_and_state():
    streamer = rnnattn_ext.LSTM(4, 5, num_layers=2).streamer()
    assert repr(streamer) == ("rnnattn_ext.Streamer(cell=lstm, num_layers=2, input_size=4, dtype=torch.float32, "
                              "device=cpu, state=None)")
    streamer.step(torch.randn(3, 4))
    assert repr(streamer).endswith("state=batch 3)")
    attention = rnnattn_ext.AttnGRU(4, 6, num_heads=2, memory_size=3).double().streamer(torch.randn(5, 2, 3).double())
    assert "cell=gru, num_layers=1, input_size=4, dtype=torch.float64, device=cpu, num_heads=2, memory=[5, 2, 3]" in (
        repr(attention))


def test_autocast_does_not_apply():
    torch.manual_seed(39)
    module = rnnattn_ext.GRU(3, 4)
    x = torch.randn(2, 3)
    expected = module.streamer().step(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module.streamer().step(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_empty_batch():
    module = rnnattn_ext.GRU(3, 4)
    streamer = module.streamer()
    assert streamer.step(torch.randn(0, 3)).shape == (0, 4)
    assert streamer.state.shape == (1, 0, 4)
    decoder = rnnattn_ext.AttnGRU(3, 4, num_heads=2, memory_size=5).streamer(torch.randn(6, 0, 5))
    assert decoder.step(torch.randn(0, 3)).shape == (0, 4)
    assert decoder.state.h.shape == (1, 0, 4)


def test_runs_under_torch_compile():
    # Dynamo cannot trace into the streamer: it runs between graphs, with its own numbers.
    torch.manual_seed(37)
    module = rnnattn_ext.GRU(3, 4).eval()
    x = torch.randn(2, 3)
    streamer = module.streamer()
    compiled = torch.compile(lambda x: streamer.step(x) * 2, backend="eager")
    torch.testing.assert_close(compiled(x), 2 * module.streamer().step(x), atol=0, rtol=0)


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_bad_input_is_named():
    module = rnnattn_ext.LSTM(4, 5)
    streamer = module.streamer()
    with pytest.raises(TypeError, match=r"Streamer.step: input must be a torch.Tensor, got list"):
        streamer.step([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"input must be \(batch, input_size\) or \(input_size,\), got shape \[1, 2, 4\]"):
        streamer.step(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be input_size = 4, got 3"):
        streamer.step(torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"input must have the module's dtype \(Float\), got Double"):
        streamer.step(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"input must be on the module's device \(cpu\), got meta"):
        streamer.step(torch.randn(2, 4, device="meta"))
    with pytest.raises(ValueError, match="runs inference only .* requires grad"):
        streamer.step(torch.randn(2, 4, requires_grad=True))
    with torch.no_grad():  # without grad mode such an input is plain data, as for the modules
        streamer.step(torch.randn(2, 4, requires_grad=True))
    state = streamer.state
    with pytest.raises(ValueError, match=r"input has batch 3 but the state batch 2 \(reset\(\) starts a new state\)"):
        streamer.step(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"an input \(input_size,\) is batch 1"):
        streamer.step(torch.randn(4))
    with pytest.raises(TypeError, match="must be a plain torch.Tensor .* got the subclass"):
        streamer.step(torch.nn.Buffer(torch.randn(2, 4)).as_subclass(_Subclass))
    with pytest.raises(RuntimeError, match="cannot run under a __torch_function__ or __torch_dispatch__ mode"), \
            _PassThrough():
        streamer.step(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record a streamer"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit.trace is deprecated
        torch.jit.trace(lambda x: streamer.step(x), (torch.randn(2, 4),))
    # A failed step leaves the state as it was.
    for mine, theirs in zip(streamer.state, state):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


class _Subclass(torch.Tensor):
    pass


def test_bad_state_is_named():
    streamer = rnnattn_ext.LSTM(4, 5, num_layers=2).streamer()
    with pytest.raises(TypeError, match=r"Streamer.reset: state must be None or a tuple \(h, c\), got Tensor"):
        streamer.reset(torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match=r"state must be a tuple \(h, c\), got 3 items"):
        streamer.reset((torch.zeros(2, 1, 5),) * 3)
    with pytest.raises(ValueError, match=r"state h must have shape \(num_layers, batch, state_size\) = \(2, B, 5\) "
                       r"or, unbatched, \(num_layers, state_size\) = \(2, 5\), got \[1, 1, 5\]"):
        streamer.reset((torch.zeros(1, 1, 5), torch.zeros(2, 1, 5)))
    with pytest.raises(ValueError, match=r"state c must have shape .* with h's B, got \[2, 3, 5\]"):
        streamer.reset((torch.zeros(2, 1, 5), torch.zeros(2, 3, 5)))
    with pytest.raises(ValueError, match=r"state c must have shape .* or, unbatched, \(num_layers, hidden_size\) = "
                       r"\(2, 5\), batched or not as h, with h's B, got \[2, 1, 5\]"):
        streamer.reset((torch.zeros(2, 5), torch.zeros(2, 1, 5)))  # h unbatched, c batched
    with pytest.raises(TypeError, match=r"state c must have the module's dtype \(Float\), got Double"):
        streamer.reset((torch.zeros(2, 1, 5), torch.zeros(2, 1, 5, dtype=torch.float64)))
    gru = rnnattn_ext.GRU(4, 5).streamer()
    with pytest.raises(ValueError, match=r"state must have shape \(num_layers, batch, state_size\) = \(1, B, 5\) "
                       r"or, unbatched, \(num_layers, state_size\) = \(1, 5\), got \[5\]"):
        gru.reset(torch.zeros(5))
    with pytest.raises(TypeError, match="state must be a torch.Tensor, got tuple"):
        gru.reset((torch.zeros(1, 1, 5),))


def test_modules_that_cannot_have_one():
    with pytest.raises(ValueError, match="streamer needs a unidirectional module"):
        rnnattn_ext.GRU(3, 4, bidirectional=True).streamer()
    with pytest.raises(ValueError, match="AttnLSTM: streamer needs a unidirectional module"):
        rnnattn_ext.AttnLSTM(3, 4, bidirectional=True).streamer()
    module = rnnattn_ext.LSTM(3, 4)
    module.weight_hh_l0 = torch.nn.Parameter(torch.randn(16, 5))
    with pytest.raises(ValueError, match=r"Streamer, layer 0: weight_hh must have shape"):
        module.streamer()
    layers = [(torch.randn(4, 3), None, None, None)]
    with pytest.raises(TypeError, match="layer 0: weight_hh must be a tensor, got None"):
        rnnattn_ext.Streamer("rnn_tanh", layers, 3, [4])
    with pytest.raises(ValueError, match="cell must be one of"):
        rnnattn_ext.Streamer("elman", layers, 3, [4])


ATTENTION_MODULES = [
    (rnnattn_ext.AttnLSTM, {"num_heads": 2, "window": 3}),
    (rnnattn_ext.AttnGRU, {"num_heads": 2}),
    (rnnattn_ext.AttnRNN, {"num_heads": 2, "window": 1}),
    (rnnattn_ext.AttnLSTM, {"num_heads": 2, "window": 3, "proj_size": 4, "num_layers": 2}),
    (rnnattn_ext.AttnGRU, {"num_heads": 2, "memory_size": 5, "num_layers": 2}),
    (rnnattn_ext.AttnLSTM, {"num_heads": 3, "head_dim": 2, "memory_size": 5, "batch_first": True}),
]
ATTENTION_IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(ATTENTION_MODULES)]


def _memory_of(module, batch, device, dtype, generator):
    """An external memory (in the module's layout) with one short row, or nothing for self memory."""
    if module.memory_size is None:
        return {}
    memory = torch.randn(4, batch, module.memory_size, generator=generator).to(device=device, dtype=dtype)
    lengths = torch.tensor([4, 2, 3][:batch], device=device)
    return {"memory": memory.transpose(0, 1) if module.batch_first else memory, "memory_lengths": lengths}


def _same_attention_state(mine, theirs, **tolerance):
    assert isinstance(mine, rnnattn_ext.AttentionState)
    for a, b in ((mine.h, theirs.h), (mine.c, theirs.c)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tolerance)
    for ours, stream in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
        assert (ours is None) == (stream is None)
        for a, b in zip(ours or [], stream or []):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,extra", ATTENTION_MODULES, ids=ATTENTION_IDS)
def test_attention_steps_give_the_numbers_of_stream(cls, extra, dtype, device):
    gen = torch.Generator().manual_seed(41)
    torch.manual_seed(41)
    module = cls(3, 6, **extra).to(device=device, dtype=dtype).eval()
    xs = torch.randn(7, 3, 3, generator=gen).to(device=device, dtype=dtype)
    memory = _memory_of(module, 3, device, dtype, gen)
    streamer = module.streamer(**memory)
    got = torch.stack([streamer.step(x) for x in xs])
    with torch.no_grad():  # the slots stream carries are then written as the streamer writes them
        expected, state = _stream_steps(module, xs, **memory)
        whole, _ = module(xs.transpose(0, 1) if module.batch_first else xs, **memory)
    whole = whole.transpose(0, 1) if module.batch_first else whole
    # Self memory's carried slots are the keys and values the streamer's steps computed, where stream
    # computes them again from the states (a product of other shapes): equal to rounding. Without
    # carried slots, float32 on the CPU is bit for bit.
    carries = module.memory_size is None and module.window != 1
    exact = dtype == torch.float32 and device == "cpu" and not carries
    tolerance = {"atol": 0, "rtol": 0} if exact else {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got, whole, **({"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}))
    _same_attention_state(streamer.state, state, **tolerance)
    # From a state stream returned, the streamer continues as stream does.
    streamer.reset(state)
    more = torch.randn(3, 3, 3, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        expected_more, state_more = _stream_steps(module, more, state, **memory)
    torch.testing.assert_close(torch.stack([streamer.step(x) for x in more]), expected_more, **tolerance)
    _same_attention_state(streamer.state, state_more, **tolerance)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window", [1, 4, None], ids=["window1", "window4", "unbounded"])
def test_self_memory_slots_kept_in_place_over_a_long_stream(window, device):
    # The streamer keeps its self-memory slots where its steps read and write them: a window's ring
    # stored twice (its start moves every step and wraps every `window` steps), an unbounded memory
    # in a store that grows when full (at 16 slots, then 34). 40 steps pass every such point. A
    # streamer restarted halfway from the state gives the rest bit for bit (the state holds the
    # slots, in order), and every step gives stream's numbers.
    gen = torch.Generator().manual_seed(47)
    module = rnnattn_ext.AttnGRU(3, 8, num_heads=2, window=window, num_layers=2).to(device).eval()
    xs = torch.randn(40, 2, 3, generator=gen).to(device)
    streamer, restarted = module.streamer(), module.streamer()
    got = torch.stack([streamer.step(x) for x in xs])
    for x in xs[:23]:
        restarted.step(x)
    state = restarted.state
    if window is not None:
        assert all(k is None for k in state.keys) if window == 1 else state.keys[0].shape == (window - 1, 2, 8)
    else:
        assert state.keys[1].shape == (23, 2, 8)
    restarted = module.streamer()
    restarted.reset(state)
    torch.testing.assert_close(torch.stack([restarted.step(x) for x in xs[23:]]), got[23:], atol=0, rtol=0)
    _same_attention_state(restarted.state, streamer.state, atol=0, rtol=0)
    with torch.no_grad():
        expected, expected_state = _stream_steps(module, xs)
    torch.testing.assert_close(got, expected)
    _same_attention_state(streamer.state, expected_state)
    # Given more past slots than its window reads, a streamer keeps the window's most recent.
    if window is not None and window > 1:
        longer = rnnattn_ext.AttentionState(state.h, None, [torch.cat([k, k]) for k in state.keys],
                                            [torch.cat([v, v]) for v in state.values])
        restarted.reset(longer)
        _same_attention_state(restarted.state, state, atol=0, rtol=0)


@pytest.mark.parametrize("extra", [{"window": 2}, {"memory_size": 5}], ids=["self", "external"])
def test_attention_in_bfloat16_on_the_cpu_rounds_as_the_module(extra):
    gen = torch.Generator().manual_seed(42)
    module = rnnattn_ext.AttnGRU(3, 6, num_heads=2, num_layers=2, **extra).to(torch.bfloat16)
    xs = torch.randn(5, 2, 3, generator=gen).to(torch.bfloat16)
    memory = _memory_of(module, 2, "cpu", torch.bfloat16, gen)
    streamer = module.streamer(**memory)
    got = torch.stack([streamer.step(x) for x in xs])
    with torch.no_grad():
        expected, state = _stream_steps(module, xs, **memory)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    _same_attention_state(streamer.state, state, atol=0, rtol=0)


def test_attention_unbatched_steps_with_an_unbatched_memory():
    gen = torch.Generator().manual_seed(43)
    module = rnnattn_ext.AttnLSTM(3, 4, num_heads=2, memory_size=5)
    memory = torch.randn(6, 5, generator=gen)
    xs = torch.randn(4, 3, generator=gen)
    streamer, batched = module.streamer(memory), module.streamer(memory.unsqueeze(1))
    outputs = []
    for x in xs:
        outputs.append(streamer.step(x))
        assert outputs[-1].shape == (4,)
        torch.testing.assert_close(outputs[-1], batched.step(x.unsqueeze(0)).squeeze(0), atol=0, rtol=0)
    with torch.no_grad():
        whole, _ = module(xs, memory=memory)
    torch.testing.assert_close(torch.stack(outputs), whole)


def test_attention_streamer_keeps_its_memory():
    gen = torch.Generator().manual_seed(44)
    module = rnnattn_ext.AttnGRU(3, 4, num_heads=2, memory_size=5)
    memory = torch.randn(6, 2, 5, generator=gen)
    x = torch.randn(2, 3, generator=gen)
    streamer = module.streamer(memory)
    before = module.streamer(memory).step(x)
    memory.zero_()
    torch.testing.assert_close(streamer.step(x), before, atol=0, rtol=0)


def test_attention_bad_arguments_are_named():
    self_memory = rnnattn_ext.AttnLSTM(3, 4, num_heads=2, window=3)
    external = rnnattn_ext.AttnGRU(3, 4, num_heads=2, memory_size=5)
    with pytest.raises(ValueError, match="built for self memory"):
        self_memory.streamer(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="built with memory_size=5: forward needs memory"):
        external.streamer()
    with pytest.raises(TypeError, match=r"memory must have the module's dtype \(Float\), got Double"):
        external.streamer(torch.randn(2, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"memory_lengths must lie in \[1, S\] = \[1, 2\], got values in \[3, 3\]"):
        external.streamer(torch.randn(2, 1, 5), torch.tensor([3]))
    streamer = external.streamer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"input has batch 2 but the memory batch 3"):
        streamer.step(torch.randn(2, 3))
    with pytest.raises(TypeError, match="state must be None or an AttentionState"):
        streamer.reset(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="state.keys and state.values must be None with an external memory"):
        streamer.reset(rnnattn_ext.AttentionState(torch.zeros(1, 3, 4), None, [torch.zeros(1, 3, 4)],
                                                  [torch.zeros(1, 3, 4)]))
    own = self_memory.streamer()
    h = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"state.keys must have one entry per layer \(1\), got 2"):
        own.reset(rnnattn_ext.AttentionState(h, h, [None, None], [None, None]))
    with pytest.raises(ValueError, match=r"state.keys\[0\] must have shape \(P, B, D\) = \(P, 2, 4\), got \[1, 3, 4\]"):
        own.reset(rnnattn_ext.AttentionState(h, h, [torch.zeros(1, 3, 4)], [torch.zeros(1, 3, 4)]))
    with pytest.raises(ValueError, match=r"state.keys\[0\] and state.values\[0\] must come together"):
        own.reset(rnnattn_ext.AttentionState(h, h, [torch.zeros(1, 2, 4)], None))


DECODERS = [
    (rnnattn_ext.AttnGRU, {"num_heads": 2, "memory_size": 5, "num_layers": 2}),
    (rnnattn_ext.AttnLSTM, {"num_heads": 3, "head_dim": 2, "memory_size": 5, "batch_first": True}),
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cls,extra", DECODERS, ids=[cls.__name__ for cls, _ in DECODERS])
def test_reset_with_a_new_memory_is_a_new_streamer_over_it(cls, extra, device):
    gen = torch.Generator().manual_seed(45)
    module = cls(3, 6, **extra).to(device).eval()
    first, second = _memory_of(module, 3, device, torch.float32, gen), _memory_of(module, 2, device, torch.float32, gen)
    streamer = module.streamer(**first)
    for x in torch.randn(3, 3, 3, generator=gen).to(device):
        streamer.step(x)
    # A new memory of another batch: the state starts from zeros (or the one given), the memory is
    # a copy, and steps give a new streamer's numbers over it, bit for bit.
    given = {name: tensor.clone() for name, tensor in second.items()}
    streamer.reset(**given)
    assert streamer.state is None and "memory=[4, 2, 5]" in repr(streamer)
    for tensor in given.values():
        tensor.add_(1)  # the streamer has its own copy
    fresh = module.streamer(**second)
    xs = torch.randn(4, 2, 3, generator=gen).to(device)
    got = torch.stack([streamer.step(x) for x in xs])
    torch.testing.assert_close(got, torch.stack([fresh.step(x) for x in xs]), atol=0, rtol=0)
    with torch.no_grad():
        whole, _ = module(xs.transpose(0, 1) if module.batch_first else xs, **second)
    torch.testing.assert_close(got, whole.transpose(0, 1) if module.batch_first else whole)
    # With a state, and without a memory: the last one given stays.
    state = streamer.state
    streamer.reset(state)
    fresh.reset(state, **second)
    more = torch.randn(2, 2, 3, generator=gen).to(device)
    torch.testing.assert_close(torch.stack([streamer.step(x) for x in more]),
                               torch.stack([fresh.step(x) for x in more]), atol=0, rtol=0)


def test_reset_with_an_unbatched_memory():
    gen = torch.Generator().manual_seed(46)
    module = rnnattn_ext.AttnLSTM(3, 4, num_heads=2, memory_size=5)
    streamer = module.streamer(torch.randn(6, 2, 5, generator=gen))
    memory, xs = torch.randn(7, 5, generator=gen), torch.randn(4, 3, generator=gen)
    streamer.reset(memory=memory, memory_lengths=[5])
    got = torch.stack([streamer.step(x) for x in xs])
    with torch.no_grad():
        whole, _ = module(xs, memory=memory, memory_lengths=[5])
    torch.testing.assert_close(got, whole)


def test_reset_on_the_streamer_itself_takes_the_ops_layout():
    # Made directly (no module), a streamer's reset takes the memory time-major, as its constructor.
    gen = torch.Generator().manual_seed(47)
    module = rnnattn_ext.AttnGRU(3, 4, num_heads=2, memory_size=5)
    layers = [tuple(None if w is None else w.detach() for w in layer) for layer in module._attention_weights()]
    memory, lengths = torch.randn(6, 2, 5, generator=gen), torch.tensor([6, 3])
    streamer = rnnattn_ext.Streamer("gru", layers, 3, [4], num_heads=2, memory=torch.randn(2, 1, 5))
    streamer.reset(memory=memory, memory_lengths=lengths)
    x = torch.randn(2, 3, generator=gen)
    torch.testing.assert_close(streamer.step(x), module.streamer(memory, lengths).step(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"memory must be 3-D \(S, B, M\), got shape \[6, 5\]"):
        streamer.reset(memory=torch.randn(6, 5))


def test_a_failed_reset_changes_nothing():
    gen = torch.Generator().manual_seed(48)
    module = rnnattn_ext.AttnGRU(3, 4, num_heads=2, memory_size=5, num_layers=2)
    memory, x = torch.randn(6, 2, 5, generator=gen), torch.randn(2, 3, generator=gen)
    streamer, twin = module.streamer(memory), module.streamer(memory)
    streamer.step(x)
    twin.step(x)
    bad = [
        ({"memory_lengths": [1, 2]}, ValueError, "memory_lengths comes with a new memory"),
        ({"memory": torch.randn(6, 2, 5, dtype=torch.float64)}, TypeError,
         r"memory must have the module's dtype \(Float\), got Double"),
        ({"memory": torch.randn(6, 2, 4)}, ValueError, "AttnGRU: memory must have batch 2 and memory_size 5"),
        ({"memory": [[1.0]]}, TypeError, "AttnGRU: memory must be a Tensor, got list"),
        ({"memory": torch.randn(3, 2, 5), "memory_lengths": [4, 1]}, ValueError,
         r"reset, layer 0: memory_lengths must lie in \[1, S\] = \[1, 3\], got values in \[1, 4\]"),
        ({"memory": torch.randn(3, 2, 5), "memory_lengths": [1.5, 2.0]}, TypeError,
         "memory_lengths must hold integers"),
        ({"state": twin.state, "memory": torch.randn(3, 5, 5)}, ValueError,
         "state has batch 2 but the new memory batch 5"),
    ]
    for arguments, error, message in bad:
        with pytest.raises(error, match=message):
            streamer.reset(**arguments)
    assert "memory=[6, 2, 5], state=batch 2" in repr(streamer)
    torch.testing.assert_close(streamer.step(x), twin.step(x), atol=0, rtol=0)


def test_only_an_external_memory_streamer_takes_a_memory():
    memory = torch.randn(2, 1, 4)
    for streamer, what in ((rnnattn_ext.AttnLSTM(3, 4, num_heads=2, window=3).streamer(), "self memory"),
                           (rnnattn_ext.GRU(3, 4).streamer(), "no attention")):
        with pytest.raises(ValueError, match=f"memory replaces the external memory .*{what}"):
            streamer.reset(memory=memory)
        with pytest.raises(ValueError, match="memory_lengths comes with a new memory"):
            streamer.reset(memory_lengths=[1])
    with pytest.raises(ValueError, match=r"memory and memory_lengths need attention \(num_heads > 0\)"):
        rnnattn_ext.Streamer("gru", [tuple(w.detach() for w in rnnattn_ext.GRU(3, 4)._layer_weights()[0])], 3, [4],
                             memory=memory)


def test_reset_and_steps_in_threads():
    # Resets over memories of other batches race with steps: each step runs over one memory whole
    # (a step of the wrong batch is refused, not run over a half-replaced memory).
    gen = torch.Generator().manual_seed(49)
    module = rnnattn_ext.AttnGRU(3, 4, num_heads=2, memory_size=5)
    memories = [torch.randn(5, batch, 5, generator=gen) for batch in (1, 2, 3)]
    streamer = module.streamer(memories[0])
    outcomes, wrong = [], []  # list.append is atomic in CPython; += on a shared count is not

    def resetter():
        for i in range(300):
            streamer.reset(memory=memories[i % 3])

    def stepper(batch):
        for _ in range(300):
            try:
                y = streamer.step(torch.ones(batch, 3))
            except ValueError as error:
                outcomes.append("refused")
                if "but the memory batch" not in str(error) and "but the state batch" not in str(error):
                    wrong.append(error)
                continue
            outcomes.append("step")
            if y.shape != (batch, 4) or not torch.isfinite(y).all():
                wrong.append(y)

    threads = [threading.Thread(target=resetter)] + [threading.Thread(target=stepper, args=(b,)) for b in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong and len(outcomes) == 900 and "step" in outcomes
    streamer.reset(memory=memories[2])
    x = torch.randn(3, 3, generator=gen)
    torch.testing.assert_close(streamer.step(x), module.streamer(memories[2]).step(x), atol=0, rtol=0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("extra", [{"window": 3}, {"window": None}, {"memory_size": 5, "batch_first": True}],
                         ids=["window", "unbounded", "external"])
def test_step_returns_the_attention_weights_forward_returns(extra, device):
    gen = torch.Generator().manual_seed(50)
    torch.manual_seed(50)
    module = rnnattn_ext.AttnGRU(3, 4, num_heads=2, num_layers=2, **extra).to(device=device, dtype=torch.float64)
    memory = _memory_of(module, 3, device, torch.float64, gen)
    xs = torch.randn(5, 3, 3, generator=gen).to(device=device, dtype=torch.float64)
    streamer = module.streamer(**memory)
    steps = [streamer.step(x, need_weights=True) for x in xs]
    with torch.no_grad():
        whole, _, attentions = module(xs.transpose(0, 1) if module.batch_first else xs, need_weights=True, **memory)
    if module.batch_first:
        whole, attentions = whole.transpose(0, 1), [a.transpose(0, 1) for a in attentions]
    for t, (output, weights) in enumerate(steps):
        torch.testing.assert_close(output, whole[t])
        assert isinstance(weights, list) and len(weights) == 2
        for layer, w in enumerate(weights):
            expected = attentions[layer][t]
            if module.memory_size is None and module.window is None:
                # Unbounded self memory: the step's slots are every state so far (forward pads them
                # to the sequence's length with zeros before the first).
                assert w.shape == (3, 2, t + 1) and bool((expected[..., : -(t + 1)] == 0).all())
                expected = expected[..., -(t + 1):]
            torch.testing.assert_close(w, expected)
            torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    torch.testing.assert_close(steps[-1][0], streamer.state.h[-1], atol=0, rtol=0)  # the state moved on
    # Without need_weights the same step gives the same output.
    again = module.streamer(**memory)
    torch.testing.assert_close(torch.stack([again.step(x) for x in xs]), torch.stack([o for o, _ in steps]),
                               atol=0, rtol=0)


def test_weights_of_an_unbatched_step_and_in_bfloat16():
    gen = torch.Generator().manual_seed(51)
    module = rnnattn_ext.AttnLSTM(3, 4, num_heads=2, memory_size=5)
    memory = torch.randn(6, 5, generator=gen)
    x = torch.randn(3, generator=gen)
    output, (weights,) = module.streamer(memory, [4]).step(x, need_weights=True)
    assert output.shape == (4,) and weights.shape == (2, 6)
    assert bool((weights[:, 4:] == 0).all())  # positions at or past memory_lengths
    low = module.to(torch.bfloat16)
    _, (low_weights,) = low.streamer(memory.to(torch.bfloat16), [4]).step(x.to(torch.bfloat16), need_weights=True)
    with torch.no_grad():
        _, _, (expected,) = low(x.to(torch.bfloat16).unsqueeze(0), memory=memory.to(torch.bfloat16), memory_lengths=[4],
                                need_weights=True)
    assert low_weights.dtype == torch.bfloat16
    torch.testing.assert_close(low_weights, expected[0], atol=0, rtol=0)


def test_need_weights_needs_attention():
    with pytest.raises(ValueError, match="need_weights is for the attention modules' streamers"):
        rnnattn_ext.LSTM(3, 4).streamer().step(torch.randn(1, 3), need_weights=True)
    with pytest.raises(TypeError):
        rnnattn_ext.AttnLSTM(3, 4, num_heads=2).streamer().step(torch.randn(1, 3), need_weights="yes")
