"""The demo's character language models: embedding -> recurrent core -> linear read-out. They differ
only in the core: our attention-augmented LSTM (self memory), our LSTM, and torch.nn.LSTM."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import AttnLSTM, LSTM

KINDS = ("attn_lstm", "lstm", "torch_lstm")
LABELS = {"attn_lstm": "rnnattn_ext.AttnLSTM", "lstm": "rnnattn_ext.LSTM", "torch_lstm": "torch.nn.LSTM"}


class CharModel(nn.Module):
    def __init__(self, kind: str, vocab: int, embed: int, hidden: int, layers: int, heads: int, head_dim: int,
                 window: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"rnnattn_ext.demo: model kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.embed = nn.Embedding(vocab, embed)
        self.core: nn.Module
        if kind == "attn_lstm":
            self.core = AttnLSTM(embed, hidden, num_layers=layers, num_heads=heads, head_dim=head_dim, window=window,
                                 batch_first=True)
        elif kind == "lstm":
            self.core = LSTM(embed, hidden, num_layers=layers, batch_first=True)
        else:
            self.core = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, codes: Tensor) -> Tensor:
        """Logits (B, T, vocab) of the next character after each of codes (B, T)."""
        output, _ = self.core(self.embed(codes))
        return self.head(output)

    def streaming_core(self) -> LSTM | AttnLSTM:
        """A module with ``stream``: ours, or for torch.nn.LSTM our drop-in LSTM with its weights."""
        if isinstance(self.core, (LSTM, AttnLSTM)):
            return self.core
        twin = LSTM(self.core.input_size, self.core.hidden_size, num_layers=self.core.num_layers, batch_first=True)
        twin.load_state_dict(self.core.state_dict())
        return twin.to(self.head.weight.device)

    @torch.no_grad()
    def generate(self, prompt: Tensor, length: int, temperature: float, generator: torch.Generator) -> list[int]:
        """Feeds the prompt (1-D codes) and then samples ``length`` characters one step at a time
        through the streaming API, carrying the recurrent state (and AttnLSTM's memory window)."""
        core = self.streaming_core()
        device = self.head.weight.device
        output, state = core.stream(self.embed(prompt.to(device).view(1, -1)), None)
        logits = self.head(output[:, -1])
        produced = []
        for _ in range(length):
            probabilities = torch.softmax(logits.float().cpu() / temperature, dim=-1)
            code = int(torch.multinomial(probabilities, 1, generator=generator))
            produced.append(code)
            output, state = core.stream(self.embed(torch.tensor([[code]], device=device)), state)
            logits = self.head(output[:, -1])
        return produced
