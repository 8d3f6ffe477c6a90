"""Variable lengths in the modules: PackedSequence in and out exactly as torch.nn (sorted or not), and
the ``lengths`` argument; the attention modules against the reference over the same lengths."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnattn_ext
from rnnattn_ext import reference

from conftest import device_params
from test_modules import MODULES, make_pair, random_hx

LENGTHS = [4, 7, 1, 7, 3]  # unsorted, a repeat, the shortest (1) and the longest (T)


def _flat(result):
    output, hidden = result
    data = output.data if isinstance(output, PackedSequence) else output
    return [data, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def _check(got, ref, atol, rtol, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"{what} {i}: {a.shape} vs {b.shape}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, i=i: f"{what} {i}: {m}")


PACKED_GRID = list(itertools.product([False, True], [1, 2], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("enforce_sorted,num_layers,bidirectional,batch_first,with_hx", PACKED_GRID)
def test_packed_sequence_matches_torch_nn(kind, enforce_sorted, num_layers, bidirectional, batch_first, with_hx,
                                          device, dtype=torch.float64, atol=1e-9, rtol=1e-7):
    torch.manual_seed(7)
    theirs, ours = make_pair(kind, 5, 6, device, dtype, num_layers=num_layers, bidirectional=bidirectional,
                             batch_first=batch_first)
    lengths = torch.tensor(sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS)
    steps, batch = int(lengths.max()), len(lengths)
    padded = torch.randn((batch, steps, 5) if batch_first else (steps, batch, 5), device=device, dtype=dtype,
                         requires_grad=True)
    def packed():  # one graph per module: each backward frees its own
        return pack_padded_sequence(padded, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)

    layers = num_layers * (2 if bidirectional else 1)
    hx = random_hx(kind, layers, batch, 6, False, device, dtype) if with_hx else None
    ref_out, got_out = theirs(packed(), hx), ours(packed(), hx)
    assert isinstance(got_out[0], PackedSequence)
    assert torch.equal(got_out[0].batch_sizes, ref_out[0].batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(got_out[0], name), getattr(ref_out[0], name)
        assert (a is None and b is None) or torch.equal(a, b), name
    ref, got = _flat(ref_out), _flat(got_out)
    _check(got, ref, atol, rtol, "output/state")
    probes = [torch.randn_like(t) for t in ref]
    leaves = [padded] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    ref_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, probes)), leaves + list(theirs.parameters()))
    got_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, probes)), leaves + list(ours.parameters()))
    _check(got_grads, ref_grads, atol * 10, rtol * 10, "gradient")


@pytest.mark.parametrize("kind", MODULES)
def test_packed_float32_matches_torch_nn(kind):
    test_packed_sequence_matches_torch_nn(kind, False, 2, True, False, True, "cpu", torch.float32, 2e-5, 1e-4)


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_argument_equals_packed_sequence(kind, batch_first):
    # lengths= on a padded tensor is the PackedSequence path in the padded layout: zeros past each row's end.
    torch.manual_seed(8)
    _, ours = make_pair(kind, 5, 6, num_layers=2, bidirectional=True, batch_first=batch_first)
    lengths = torch.tensor(LENGTHS)
    shape = (len(LENGTHS), 7, 5) if batch_first else (7, len(LENGTHS), 5)
    padded = torch.randn(shape, dtype=torch.float64)
    packed = pack_padded_sequence(padded, lengths, batch_first=batch_first, enforce_sorted=False)
    out_packed, hidden_packed = ours(packed)
    out, hidden = ours(padded, lengths=lengths)
    expected, _ = pad_packed_sequence(out_packed, batch_first=batch_first, total_length=7)
    # The packed path runs longest first, this one in the caller's order: equal up to rounding.
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    padded_steps = torch.arange(7).unsqueeze(1) >= lengths.unsqueeze(0)
    assert torch.count_nonzero((out.transpose(0, 1) if batch_first else out)[padded_steps]) == 0
    for a, b in zip(_flat((out, hidden))[1:], _flat((out_packed, hidden_packed))[1:]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # A list of ints serves as well as a tensor.
    assert torch.equal(ours(padded, lengths=LENGTHS)[0], out)


def test_unbatched_input_takes_a_scalar_length():
    m = rnnattn_ext.GRU(3, 4)
    x = torch.randn(6, 3)
    out, h = m(x, lengths=4)
    ref_out, ref_h = m(x[:4])
    torch.testing.assert_close(out[:4], ref_out)
    assert torch.count_nonzero(out[4:]) == 0
    torch.testing.assert_close(h, ref_h)


def test_module_lengths_errors_name_the_argument():
    m = rnnattn_ext.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"LSTM: lengths must lie in \[1, T\] = \[1, 5\], got values in \[0, 3\]"):
        m(x, lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"LSTM: lengths must lie in \[1, T\] = \[1, 5\], got values in \[3, 6\]"):
        m(x, lengths=[3, 6])
    with pytest.raises(ValueError, match=r"LSTM: lengths must have shape \(B,\) = \(2,\), got \(3,\)"):
        m(x, lengths=[3, 2, 1])
    with pytest.raises(TypeError, match="LSTM: lengths must hold integers, got torch.float32"):
        m(x, lengths=torch.tensor([3.0, 2.0]))
    packed = pack_padded_sequence(x, torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="lengths must be None for PackedSequence input"):
        m(packed, lengths=[5, 2])


ATTENTION_MODULES = {"AttnLSTM": ("lstm", rnnattn_ext.AttnLSTM), "AttnGRU": ("gru", rnnattn_ext.AttnGRU),
                     "AttnRNN": ("rnn_tanh", rnnattn_ext.AttnRNN)}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window,memory_size", [(None, None), (2, None), (None, 4)], ids=["self", "self-w2", "external"])
@pytest.mark.parametrize("kind", ATTENTION_MODULES)
def test_attention_module_with_packed_sequence(kind, window, memory_size, device):
    torch.manual_seed(9)
    cell, cls = ATTENTION_MODULES[kind]
    m = cls(5, 6, num_layers=2, bidirectional=True, num_heads=2, head_dim=3, window=window,
            memory_size=memory_size).to(device=device, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    padded = torch.randn(7, len(LENGTHS), 5, device=device, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(3, len(LENGTHS), 4, device=device, dtype=torch.float64) if memory_size else None
    memory_lengths = torch.tensor([3, 1, 2, 3, 2], device=device) if memory_size else None
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    out, hidden = m(packed, memory=memory, memory_lengths=memory_lengths)
    assert isinstance(out, PackedSequence)
    states = [torch.zeros(4, len(LENGTHS), 6, device=device, dtype=torch.float64)
              for _ in range(2 if cell == "lstm" else 1)]
    ref_out, ref_finals, _ = reference.attention_stack(
        cell, padded, states, m._attention_weights(), 2, True, 2, window, memory, memory_lengths,
        lengths=lengths.to(device))
    got_out, _ = pad_packed_sequence(out, total_length=7)
    torch.testing.assert_close(got_out, ref_out, atol=1e-10, rtol=1e-9)
    for a, b in zip(hidden if isinstance(hidden, tuple) else (hidden,), ref_finals):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    probe = torch.randn_like(ref_out)
    got_grad = torch.autograd.grad((got_out * probe).sum(), [padded, *m.parameters()])
    ref_grad = torch.autograd.grad((ref_out * probe).sum(), [padded, *m.parameters()])
    _check(got_grad, ref_grad, 1e-9, 1e-8, "gradient")


@pytest.mark.parametrize("memory_size", [None, 4], ids=["self", "external"])
def test_attention_weights_of_packed_input_are_in_the_callers_order(memory_size):
    torch.manual_seed(10)
    m = rnnattn_ext.AttnGRU(5, 6, num_heads=2, head_dim=3, memory_size=memory_size).double()
    lengths = torch.tensor(LENGTHS)
    padded = torch.randn(7, len(LENGTHS), 5, dtype=torch.float64)
    memory = torch.randn(3, len(LENGTHS), 4, dtype=torch.float64) if memory_size else None
    memory_lengths = torch.tensor([3, 1, 2, 3, 2]) if memory_size else None
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    _, h_packed, weights_packed = m(packed, memory=memory, memory_lengths=memory_lengths, need_weights=True)
    _, h, weights = m(padded, memory=memory, memory_lengths=memory_lengths, need_weights=True, lengths=lengths)
    torch.testing.assert_close(h_packed, h, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(weights_packed[0], weights[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_hybrid_block_with_lengths_runs_each_row_alone(bidirectional):
    torch.manual_seed(11)
    block = rnnattn_ext.HybridBlock(5, 6, num_heads=2, window=3, cell="gru", bidirectional=bidirectional,
                                    batch_first=True).double()
    x = torch.randn(len(LENGTHS), 7, 5, dtype=torch.float64)
    out, hidden = block(x, lengths=LENGTHS)
    for b, length in enumerate(LENGTHS):
        alone, alone_hidden = block(x[b : b + 1, :length])
        torch.testing.assert_close(out[b, :length], alone[0], atol=1e-12, rtol=1e-10)
        assert torch.count_nonzero(out[b, length:]) == 0
        torch.testing.assert_close(hidden[:, b], alone_hidden[:, 0], atol=1e-12, rtol=1e-10)
