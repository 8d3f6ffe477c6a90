"""Properties of the attention-augmented cell's reference (the oracle of the fused ops to come)."""

import pytest
import torch

from rnnattn_ext import reference

from helpers import CELLS, GATES, layer_args


def attention_weights(cell, hidden, width, memory_width, gen, zero_context=False):
    g = GATES[cell]

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.5

    w_c = torch.zeros(g * hidden, width, dtype=torch.float64) if zero_context else rand(g * hidden, width)
    return dict(weight_q=rand(width, hidden), bias_q=rand(width), weight_k=rand(width, memory_width),
                bias_k=rand(width), weight_v=rand(width, memory_width), bias_v=rand(width), weight_c=w_c)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("window", [1, 3, None])
def test_zero_context_weight_gives_the_base_cell(cell, window):
    gen = torch.Generator().manual_seed(0)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 7, 2, 3, 6, requires_grad=False, generator=gen)
    attn = attention_weights(cell, 6, 8, 6, gen, zero_context=True)
    out, finals, _, _ = reference.attention_layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, **attn, num_heads=2,
                                                  window=window)
    base_out, base_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(out, base_out)
    for a, b in zip(finals, base_finals):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_window_one_context_is_the_value_of_the_previous_state(cell, reverse):
    gen = torch.Generator().manual_seed(1)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 6, 3, 4, 5, requires_grad=False, generator=gen)
    attn = attention_weights(cell, 5, 4, 5, gen)
    out, _, ctx, weights = reference.attention_layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, **attn, num_heads=4,
                                                     window=1, reverse=reverse)
    order = list(range(5, -1, -1)) if reverse else list(range(6))
    h_prev = states[0]
    for t in order:
        torch.testing.assert_close(ctx[t], h_prev @ attn["weight_v"].t() + attn["bias_v"])
        h_prev = out[t]
    assert torch.equal(weights, torch.ones_like(weights))


@pytest.mark.parametrize("window", [2, 4, None])
def test_self_attention_weights_sum_to_one_over_existing_slots(window):
    gen = torch.Generator().manual_seed(2)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args("lstm", 6, 2, 3, 4, requires_grad=False, generator=gen)
    attn = attention_weights("lstm", 4, 6, 4, gen)
    _, _, _, weights = reference.attention_layer("lstm", x, states, w_ih, w_hh, b_ih, b_hh, **attn, num_heads=3,
                                                 window=window)
    slots = window or 6
    assert weights.shape == (6, 2, 3, slots)
    for t in range(6):
        existing = min(t + 1, slots)
        torch.testing.assert_close(weights[t].sum(-1), torch.ones(2, 3, dtype=torch.float64))
        assert torch.all(weights[t, ..., : slots - existing] == 0)
        assert torch.all(weights[t, ..., slots - existing:] > 0)


@pytest.mark.parametrize("cell", CELLS)
def test_external_memory_ignores_padded_rows(cell):
    gen = torch.Generator().manual_seed(3)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 4, 6, requires_grad=False, generator=gen)
    attn = attention_weights(cell, 6, 4, 7, gen)
    memory = torch.randn(8, 3, 7, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([8, 3, 1])
    out, finals, ctx, weights = reference.attention_layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, **attn,
                                                          num_heads=2, memory=memory, memory_lengths=lengths)
    assert weights.shape == (x.shape[0], x.shape[1], 2, memory.shape[0])
    garbage = memory.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[n:, b] = 1e3
    out2, _, ctx2, _ = reference.attention_layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, **attn, num_heads=2,
                                                 memory=garbage, memory_lengths=lengths)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(ctx, ctx2)
    # A single valid row: the context is that row's value for every step.
    torch.testing.assert_close(ctx[:, 2], (memory[0, 2] @ attn["weight_v"].t() + attn["bias_v"]).expand(5, -1))


def test_num_heads_must_divide_width():
    gen = torch.Generator().manual_seed(4)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args("gru", 3, 2, 3, 4, requires_grad=False, generator=gen)
    attn = attention_weights("gru", 4, 6, 4, gen)
    with pytest.raises(ValueError, match="num_heads \\(4\\) must divide the attention width D = 6"):
        reference.attention_layer("gru", x, states, w_ih, w_hh, b_ih, b_hh, **attn, num_heads=4)
