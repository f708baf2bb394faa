"""A checkpoint's AdamW moments move between bitsandbytes' optimizer (one rank, DDP) and torch's (FSDP2): the
resumed steps are the ones the writing optimizer would have taken."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from kubetune_trainer.optimizer_state import BNB_WRAPPED, adapted, saved_kind

from kubetune.errors import SpecError

Stepped = tuple[torch.nn.Parameter, torch.optim.Optimizer]


def stepped(cls: type[torch.optim.Optimizer], steps: int, **kwargs: float) -> Stepped:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 8))
    optimizer = cls([param], lr=1e-2, weight_decay=0.1, **kwargs)
    for i in range(steps):
        param.grad = torch.sin(param.detach() * (i + 1))
        optimizer.step()
    return param, optimizer


@pytest.mark.parametrize(("writer", "reader"), [(bnb.optim.PagedAdamW32bit, torch.optim.AdamW),
                                                (torch.optim.AdamW, bnb.optim.PagedAdamW32bit)])
def test_moments_move_between_bitsandbytes_and_torch_adamw(writer: type[torch.optim.Optimizer],
                                                           reader: type[torch.optim.Optimizer]) -> None:
    reference, _ = stepped(writer, 5)
    param, optimizer = stepped(writer, 3)
    saved = optimizer.state_dict()
    resumed = torch.nn.Parameter(param.detach().clone())
    other = reader([resumed], lr=1e-2, weight_decay=0.1)
    moments = adapted(saved, other)
    assert saved_kind(moments) == ("torch" if reader is torch.optim.AdamW else "bitsandbytes")
    other.load_state_dict(moments)
    for i in range(3, 5):
        resumed.grad = torch.sin(resumed.detach() * (i + 1))
        other.step()
    torch.testing.assert_close(resumed.detach(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_same_kind_is_left_alone_and_8bit_is_refused() -> None:
    _, optimizer = stepped(bnb.optim.PagedAdamW32bit, 1)
    saved = optimizer.state_dict()
    assert adapted(saved, optimizer) is saved and BNB_WRAPPED in next(iter(saved["state"].values()))
    big = torch.nn.Parameter(torch.randn(8192))  # 8-bit moments from 4096 elements on
    eight = bnb.optim.PagedAdamW8bit([big])
    big.grad = torch.ones_like(big)
    eight.step()
    with pytest.raises(SpecError, match=r"paged_adamw_8bit .* cannot resume under FSDP"):
        adapted(eight.state_dict(), torch.optim.AdamW([big]))
