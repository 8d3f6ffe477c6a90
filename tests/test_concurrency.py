"""Inference from 8 threads at once on shared modules gives what running the same calls one after
another gives, bit for bit (each call keeps its own buffers; the engine's per-thread arena belongs to
the calling thread)."""

from concurrent.futures import ThreadPoolExecutor

import torch

import rnnattn_ext


def _models():
    torch.manual_seed(0)
    return {
        "lstm": rnnattn_ext.LSTM(6, 40, num_layers=2, bidirectional=True),
        "lstm_proj": rnnattn_ext.LSTM(6, 70, proj_size=9),
        "gru": rnnattn_ext.GRU(6, 72),
        "rnn": rnnattn_ext.RNN(6, 16, nonlinearity="relu"),
        "attn_lstm": rnnattn_ext.AttnLSTM(6, 64, num_heads=4, window=5),
        "attn_gru": rnnattn_ext.AttnGRU(6, 16, num_heads=2, memory_size=5),
        "hybrid": rnnattn_ext.HybridBlock(6, 16, num_heads=2, window=4, cell="gru"),
    }


def _jobs():
    gen = torch.Generator().manual_seed(1)
    jobs = []
    for i in range(4):
        steps, batch = 5 + 3 * i, 1 + i
        x = torch.randn(steps, batch, 6, generator=gen)
        lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
        memory = torch.randn(4, batch, 5, generator=gen)
        jobs.append((x, lengths, memory))
    return jobs


def _run(model_name, model, job):
    x, lengths, memory = job
    with torch.no_grad():
        if model_name == "attn_gru":
            return model(x, memory=memory)[0]
        return model(x, lengths=lengths)[0]


def test_eight_threads_give_the_serial_results():
    models, jobs = _models(), _jobs()
    work = [(name, j) for name in models for j in range(len(jobs))] * 3
    serial = {(name, j): _run(name, models[name], jobs[j]) for name, j in work}
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda w: (w, _run(w[0], models[w[0]], jobs[w[1]])), reversed(work)))
    assert len(results) == len(work)
    for (name, j), output in results:
        assert torch.equal(output, serial[(name, j)]), (name, j)
