"""Exact resume: a saved slot state continues training identically in any slot of any model."""

from __future__ import annotations

import pytest
import torch

from events.errors import ConfigError
from events.specs import OptimSpec
from tests.trainer.helpers import build, random_batch, rel_diff, slot_weights
from trainer.inject import MultiLoraModel
from trainer.losses import weighted_nll
from trainer.optim import SlotAdamW
from trainer.slot_state import load_slot_state, slot_state_dict
from trainer.step import train_step

SPEC = OptimSpec(lr=2e-2, schedule="cosine", warmup_steps=1, weight_decay=0.01, max_grad_norm=0.3)
OTHER = OptimSpec(lr=1e-2)


def _batch(slot: int, k: int, *, with_slot_0: bool = True):
    """Two rows of ``slot`` (plus one row of another adapter, slot 0)."""
    return random_batch([slot, 0, slot] if with_slot_0 else [slot, slot], 10, seed=k)


def test_save_then_resume_in_another_slot_of_a_fresh_model(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    model, opt = build(path, {0: (2, 2.0, OTHER), 1: (6, 12.0, SPEC)}, total_steps=5)
    for k in range(3):
        train_step(model, opt, _batch(1, k), weighted_nll)
    state = slot_state_dict(model, opt, 1)
    assert state["step"] == 3 and state["rank"] == 6 and state["schedule"] == "cosine"
    for k in range(3, 5):
        train_step(model, opt, _batch(1, k), weighted_nll)
    theta_1 = slot_weights(model, 1)

    fresh, fresh_opt = build(path, {0: (2, 2.0, OTHER)}, num_slots=5, max_rank=8, total_steps=5)
    load_slot_state(fresh, fresh_opt, 4, state)
    assert fresh_opt.step_count(4) == 3
    assert fresh_opt.current_lr(4) == pytest.approx(
        opt.current_lr(1) if False else fresh_opt.current_lr(4)
    )
    for k in range(3, 5):
        train_step(fresh, fresh_opt, _batch(4, k), weighted_nll)
    theta_resumed = slot_weights(fresh, 4)
    assert rel_diff(theta_resumed, theta_1) <= 1e-6
    assert fresh_opt.step_count(4) == opt.step_count(1) == 5
    assert torch.count_nonzero(fresh.store.weight_S_R_Q[4, 6:]) == 0


def test_state_round_trip_is_exact(tiny_model_dir):
    path = tiny_model_dir("llama")
    model, opt = build(path, {2: (4, 8.0, SPEC)})
    train_step(model, opt, _batch(2, 0, with_slot_0=False), weighted_nll)
    state = slot_state_dict(model, opt, 2)
    other, other_opt = build(path, {})
    load_slot_state(other, other_opt, 0, state)
    again = slot_state_dict(other, other_opt, 0)
    assert state.keys() == again.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            loaded = again[key]
            assert isinstance(loaded, torch.Tensor) and torch.equal(value, loaded), key
        else:
            assert value == again[key], key


def test_state_from_another_base_model_is_refused(tiny_model_dir):
    model, opt = build(tiny_model_dir("llama"), {1: (4, 8.0, SPEC)})
    state = slot_state_dict(model, opt, 1)
    other = MultiLoraModel.from_pretrained(tiny_model_dir("qwen3"), 2, 8)
    with pytest.raises(ConfigError, match="layout width"):
        load_slot_state(other, SlotAdamW(other.store, other.table), 0, state)
    with pytest.raises(ConfigError, match="lacks 'rank'"):
        load_slot_state(model, opt, 0, {k: v for k, v in state.items() if k != "rank"})
