"""training.optim.AdamW: the same update as torch.optim.AdamW, bit for bit, and interchangeable state_dicts."""
from __future__ import annotations

import pytest
import torch

from training.optim import AdamW, make_optimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(4, 3), (5,), (2, 2), (3, 7)]]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    # Two groups with their own lr and weight decay, as LoRA+ and text-encoder groups make them.
    return [dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3, weight_decay=0.0)]


def _run(opt, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            # The third parameter gets no gradient on even steps, so step counts differ between parameters.
            p.grad = None if (i == 2 and step % 2 == 0) else torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_adamw_matches_torch_bit_for_bit():
    ours_p, ref_p = _params(), _params()
    ours = AdamW(_groups(ours_p), betas=(0.9, 0.99), eps=1e-6)
    ref = torch.optim.AdamW(_groups(ref_p), betas=(0.9, 0.99), eps=1e-6, foreach=True)
    _run(ours, ours_p, range(5))
    _run(ref, ref_p, range(5))
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b)


@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
def test_state_dicts_load_into_each_other_and_training_goes_on_identically(direction):
    first_p, second_p, cont_p = _params(), _params(), _params()
    make = {"ours": lambda ps: AdamW(_groups(ps)), "torch": lambda ps: torch.optim.AdamW(_groups(ps), foreach=True)}
    src, dst = direction.split("->")
    # Uninterrupted: 6 steps with the destination kind. Interrupted: 3 with the source kind, save, 3 more.
    full = make[dst](first_p)
    _run(full, first_p, range(6))
    before = make[src](second_p)
    _run(before, second_p, range(3))
    saved = before.state_dict()
    with torch.no_grad():
        for a, b in zip(cont_p, second_p):
            a.copy_(b)
    after = make[dst](cont_p)
    after.load_state_dict(saved)
    _run(after, cont_p, range(3, 6))
    for a, b in zip(cont_p, first_p):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_refuses_other_groups():
    opt = AdamW(_groups(_params()))
    other = AdamW([dict(params=_params()[:3])])
    with pytest.raises(ValueError, match="parameter groups of sizes"):
        opt.load_state_dict(other.state_dict())


def test_make_optimizer_gives_ours_and_keeps_lr_settable():
    params = _params()
    opt = make_optimizer([dict(params=params, lr=1e-3, initial_lr=1e-3, weight_decay=0.0)], "adamw",
                         torch.device("cpu"))
    assert isinstance(opt, AdamW)
    from training.optim import set_lr
    set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 5e-4
