"""The chunked loss equals the plain cross-entropy over the labelled positions, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from kubetune_trainer import loop


@pytest.mark.parametrize("chunk", [4096, 7])
def test_chunked_loss_matches_full_cross_entropy(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "LOSS_CHUNK", chunk)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    got = loop.chunked_loss_sum(hidden, targets, head)
    got.backward()
    grad_got = hidden.grad.clone()  # type: ignore[union-attr]
    hidden.grad = None
    want = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, hidden.grad)
