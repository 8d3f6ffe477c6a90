"""AttnLSTM / AttnGRU / AttnRNN against the reference with the same weights, over the grid of the base
modules (layers, directions, batch_first, batch, steps, initial states), self and external memory."""

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import reference

from helpers import assert_close

MODULES = [
    ("lstm", lambda **kw: rnnattn_ext.AttnLSTM(**kw)),
    ("lstm", lambda **kw: rnnattn_ext.AttnLSTM(proj_size=4, **kw)),
    ("gru", lambda **kw: rnnattn_ext.AttnGRU(**kw)),
    ("rnn_tanh", lambda **kw: rnnattn_ext.AttnRNN(**kw)),
    ("rnn_relu", lambda **kw: rnnattn_ext.AttnRNN(nonlinearity="relu", **kw)),
]
IDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]


def _reference_weights(module):
    return [tuple(w) for w in module._attention_weights()]


def _run(cell, make, num_layers, bidirectional, batch_first, batch, steps, with_hx, memory_size, window=2):
    torch.manual_seed(0)
    module = make(input_size=5, hidden_size=6, num_layers=num_layers, bidirectional=bidirectional,
                  batch_first=batch_first, num_heads=2, head_dim=2, window=None if memory_size else window,
                  memory_size=memory_size, dtype=torch.float64)
    directions = 2 if bidirectional else 1
    x = torch.randn(steps, batch, 5, dtype=torch.float64, requires_grad=True)
    num_states = 2 if cell == "lstm" else 1
    widths = [module.state_size, module.hidden_size][:num_states]  # h is proj_size wide with a projection
    states = [torch.randn(num_layers * directions, batch, width, dtype=torch.float64, requires_grad=True)
              for width in widths] if with_hx else None
    memory = torch.randn(4, batch, memory_size, dtype=torch.float64, requires_grad=True) if memory_size else None
    lengths = torch.tensor([4, 2, 1][:batch]) if memory_size else None

    hx = None if states is None else (tuple(states) if cell == "lstm" else states[0])
    x_in = x.transpose(0, 1) if batch_first else x
    mem_in = None if memory is None else (memory.transpose(0, 1) if batch_first else memory)
    out, h, attentions = module(x_in, hx, memory=mem_in, memory_lengths=lengths, need_weights=True)
    finals = list(h) if cell == "lstm" else [h]
    if batch_first:
        out = out.transpose(0, 1)
        attentions = [a.transpose(0, 1) for a in attentions]

    ref_states = states if states is not None else [torch.zeros(num_layers * directions, batch, width,
                                                                dtype=torch.float64) for width in widths]
    ref_out, ref_finals, ref_att = reference.attention_stack(cell, x, ref_states, _reference_weights(module),
                                                             num_layers, bidirectional, 2, None if memory_size
                                                             else window, memory, lengths)
    assert_close(out, ref_out, 1e-10, 1e-9, "output")
    for a, b in zip(finals, ref_finals):
        assert_close(a, b, 1e-10, 1e-9, "final state")
    for a, b in zip(attentions, ref_att):
        assert_close(a, b, 1e-10, 1e-9, "attention weights")
    probe = [torch.randn_like(t) for t in (out, *finals)]
    inputs = [x, *(states or []), *module.parameters()] + ([memory] if memory is not None else [])
    ours = torch.autograd.grad(sum((t * p).sum() for t, p in zip((out, *finals), probe)), inputs)
    theirs = torch.autograd.grad(sum((t * p).sum() for t, p in zip((ref_out, *ref_finals), probe)), inputs)
    for a, b in zip(ours, theirs):
        assert_close(a, b, 1e-9, 1e-8, "gradient")


@pytest.mark.parametrize("with_hx", [False, True], ids=["zero_hx", "hx"])
@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbf", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell,make", MODULES, ids=IDS)
def test_self_memory_module_matches_reference(cell, make, num_layers, bidirectional, batch_first, batch, steps,
                                               with_hx):
    _run(cell, make, num_layers, bidirectional, batch_first, batch, steps, with_hx, memory_size=None)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tbf", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell,make", MODULES, ids=IDS)
def test_external_memory_module_matches_reference(cell, make, num_layers, bidirectional, batch_first):
    _run(cell, make, num_layers, bidirectional, batch_first, batch=3, steps=5, with_hx=True, memory_size=3)


def test_projection_parameter_names_and_shapes():
    m = rnnattn_ext.AttnLSTM(5, 8, num_layers=2, bidirectional=True, num_heads=2, proj_size=4, window=3)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert m.head_dim == 2  # the attention is as wide as h by default: proj_size
    assert shapes["weight_hr_l0"] == (4, 8) and shapes["weight_hh_l1_reverse"] == (32, 4)
    assert shapes["weight_q_l0"] == (4, 4) and shapes["weight_k_l1"] == (4, 4) and shapes["weight_v_l0"] == (4, 4)
    assert shapes["weight_ih_l1"] == (32, 8) and shapes["weight_c_l0"] == (32, 4)
    out, (h, c) = m(torch.randn(6, 3, 5))
    assert out.shape == (6, 3, 8) and h.shape == (4, 3, 4) and c.shape == (4, 3, 8)
    with pytest.raises(ValueError, match="proj_size is defined for LSTM cells only"):
        rnnattn_ext.modules.RecurrentBase("gru", 5, 8, proj_size=4)


def test_parameter_names_and_shapes():
    m = rnnattn_ext.AttnLSTM(5, 8, num_layers=2, bidirectional=True, num_heads=2, head_dim=3, memory_size=7)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["weight_q_l0"] == (6, 8) and shapes["bias_q_l0"] == (6,)
    assert shapes["weight_k_l1_reverse"] == (6, 7) and shapes["weight_v_l0"] == (6, 7)
    assert shapes["weight_c_l1"] == (32, 6) and shapes["weight_ih_l1"] == (32, 16)
    no_bias = rnnattn_ext.AttnGRU(5, 8, bias=False, num_heads=4)
    assert not [n for n, _ in no_bias.named_parameters() if n.startswith("bias")]
    assert no_bias.head_dim == 2


def test_unbatched_input_and_state_dict_round_trip():
    torch.manual_seed(1)
    a = rnnattn_ext.AttnGRU(4, 6, num_heads=2, window=3)
    b = rnnattn_ext.AttnGRU(4, 6, num_heads=2, window=3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    out, h = a(x)
    assert out.shape == (5, 6) and h.shape == (1, 6)
    batched, _ = b(x.unsqueeze(1))
    torch.testing.assert_close(out, batched.squeeze(1))


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(2)
    m = rnnattn_ext.AttnLSTM(4, 6, num_layers=2, dropout=0.5, num_heads=2, window=2)
    x = torch.randn(5, 2, 4)
    m.eval()
    first, _ = m(x)
    second, _ = m(x)
    assert torch.equal(first, second)
    m.train()
    torch.manual_seed(3)
    dropped, _ = m(x)
    assert not torch.equal(first, dropped)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(num_heads=4), ValueError, "num_heads \\(4\\) must divide hidden_size \\(6\\)"),
    (dict(window=0), ValueError, "window must be >= 1 or None, got 0"),
    (dict(window=2, memory_size=3), ValueError, "window applies to self memory only"),
    (dict(head_dim=1.5), TypeError, "head_dim must be an int or None, got float"),
    (dict(memory_size=0), ValueError, "memory_size must be >= 1"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        rnnattn_ext.AttnLSTM(4, 6, **kwargs)


def test_forward_memory_errors():
    self_memory = rnnattn_ext.AttnGRU(4, 6, num_heads=2)
    x = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="built for self memory"):
        self_memory(x, memory=torch.randn(3, 2, 6))
    external = rnnattn_ext.AttnGRU(4, 6, num_heads=2, memory_size=3)
    with pytest.raises(ValueError, match="forward needs memory"):
        external(x)
    with pytest.raises(ValueError, match="memory must have batch 2 and memory_size 3"):
        external(x, memory=torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="memory_lengths must lie in \\[1, S\\] = \\[1, 3\\], got values in \\[0, 3\\]"):
        external(x, memory=torch.randn(3, 2, 3), memory_lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="memory_lengths must lie in \\[1, S\\] = \\[1, 3\\], got values in \\[2, 4\\]"):
        external(x, memory=torch.randn(3, 2, 3), memory_lengths=[4, 2])
    with pytest.raises(TypeError, match="memory_lengths must hold integers"):
        external(x, memory=torch.randn(3, 2, 3), memory_lengths=torch.tensor([1.0, 2.0]))
