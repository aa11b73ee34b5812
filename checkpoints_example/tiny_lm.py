"""A tiny causal language model and its text, as a user's own code for `--model` and `--data`.

Samples are dicts as a Hugging Face dataset in torch format gives them: `input_ids`,
`attention_mask` and `labels` (the next token, -100 at padding), so the model is called as
`model(input_ids=..., attention_mask=...)` and the built-in `ce` takes its logits per token:

    hessian-cli train --model checkpoints_example/tiny_lm.py:make \\
        --data checkpoints_example/tiny_lm.py:text --optimizer eigensam --epochs 3 --out runs/lm
    hessian-cli analyze runs/lm --model checkpoints_example/tiny_lm.py:make \\
        --data checkpoints_example/tiny_lm.py:text --top-k 3 --trace
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB = 16
LENGTH = 12  # tokens per padded sequence


class TinyLM(nn.Module):
    """Token and position embeddings, one causal self-attention layer, logits per token."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(LENGTH, width)
        self.layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        h = self.tokens(input_ids) + self.positions(torch.arange(n, device=input_ids.device))
        # True where a position may not look: later tokens, and padding (bool, both alike).
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).triu(1)
        h = self.layer(h, src_mask=causal, src_key_padding_mask=attention_mask == 0, is_causal=True)
        return self.head(h)


class MarkovText(Dataset):
    """Sequences of 6 to LENGTH tokens from a fixed random Markov chain, padded with 0."""

    def __init__(self, count: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        chain = torch.softmax(
            3 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)), 1
        )
        self.ids = torch.zeros(count, LENGTH, dtype=torch.long)
        self.mask = torch.zeros(count, LENGTH, dtype=torch.long)
        for i in range(count):
            n = int(torch.randint(6, LENGTH + 1, (1,), generator=g))
            token = int(torch.randint(VOCAB, (1,), generator=g))
            for t in range(n):
                self.ids[i, t], self.mask[i, t] = token, 1
                token = int(torch.multinomial(chain[token], 1, generator=g))
        following = torch.cat([self.ids[:, 1:], torch.zeros(count, 1, dtype=torch.long)], 1)
        labelled = torch.cat([self.mask[:, 1:], torch.zeros(count, 1, dtype=torch.long)], 1)
        self.labels = torch.where(labelled.bool(), following, torch.full_like(following, -100))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def make() -> TinyLM:
    return TinyLM()


def text() -> tuple[MarkovText, MarkovText]:
    """A training and a test split of the same chain."""
    return MarkovText(256, seed=0), MarkovText(64, seed=1)
