"""rega.modules.fast_lora against peft's own LoRA forward: same loss and gradients where the computation is the same
(no dropout, eval mode, gradient checkpointing), the same dropout law where it is not, same files."""

from __future__ import annotations

import pytest
import torch

from rega.config import ModelConfig
from rega.modules.fast_lora import FastLoraLinear, drop
from rega.modules.lit_module import REGAModule
from rega.modules.model import LoraSettings


def module(model_dir, fast: bool, dropout: float = 0.05, checkpointing: bool = False) -> REGAModule:
    m = REGAModule(
        model=ModelConfig(name_or_path=str(model_dir), gradient_checkpointing=checkpointing),
        lora=LoraSettings(dropout=dropout),
        fast_lora=fast,
    )
    m.configure_model()
    torch.manual_seed(
        1
    )  # the same adapter weights each time; peft starts B at zero: give B values so A gets gradients
    for name, p in m.model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.05)
    return m


def packed_batch(vocab: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    lengths = [[20, 13, 31], [40, 24]]
    ids = torch.randint(5, vocab, (2, 64))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def loss_and_grads(m: REGAModule, batch, seed: int = 3):
    m.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses, _ = m.token_losses(batch)
    loss = losses.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients_as_peft_without_dropout(tiny_model_dir, checkpointing):
    batch = packed_batch()
    fast = module(tiny_model_dir, True, dropout=0.0, checkpointing=checkpointing)
    plain = module(tiny_model_dir, False, dropout=0.0, checkpointing=checkpointing)
    assert any(isinstance(m, FastLoraLinear) for m in fast.model.modules())
    assert not any(isinstance(m, FastLoraLinear) for m in plain.model.modules())
    assert_same(loss_and_grads(fast, batch), loss_and_grads(plain, batch))


def test_same_loss_as_peft_in_eval_mode(tiny_model_dir):
    batch = packed_batch()
    fast, plain = module(tiny_model_dir, True), module(tiny_model_dir, False)
    fast.model.eval(), plain.model.eval()
    assert_same(loss_and_grads(fast, batch), loss_and_grads(plain, batch))


def test_disabled_adapter_is_the_base_model(tiny_model_dir):
    batch = packed_batch()
    fast, plain = module(tiny_model_dir, True), module(tiny_model_dir, False)
    with torch.no_grad(), fast.model.disable_adapter(), plain.model.disable_adapter():
        torch.testing.assert_close(fast.token_losses(batch)[0], plain.token_losses(batch)[0])


def test_same_parameters_and_adapter_files(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from rega.modules.lit_module import save_adapter
    from rega.modules.model import load_model

    fast, plain = module(tiny_model_dir, True), module(tiny_model_dir, False)
    assert list(fast.state_dict()) == list(plain.state_dict())
    save_adapter(fast.model, fast.tokenizer, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir))), tmp_path / "adapter"
    )
    theirs = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    ours = {k.replace(".default", ""): v for k, v in fast.model.state_dict().items() if "lora_" in k}
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name])


def test_seeded_dropout_repeats_and_differs_between_seeds(tiny_model_dir):
    """Resume exactness needs the masks to be a function of the seed set before the step."""
    batch = packed_batch()
    fast = module(tiny_model_dir, True, dropout=0.3)
    a, b, c = (loss_and_grads(fast, batch, seed)[0] for seed in (5, 5, 6))
    assert a == b and a != c


def test_siblings_share_one_mask_and_singles_get_their_own(tiny_model_dir):
    """q/k/v (and gate/up) see the same dropped input; each adapter's mask keeps 1-p of its input."""
    fast = module(tiny_model_dir, True, dropout=0.5)
    attn = fast.model.get_base_model().model.layers[0].self_attn
    mlp = fast.model.get_base_model().model.layers[0].mlp
    # The fused product splits per member: compare each member's A-product with A applied to a shared dropped x.
    x = torch.randn(4, 7, attn.q_proj.in_features)
    group = attn.q_proj._fast_group
    assert group is attn.k_proj._fast_group is attn.v_proj._fast_group and group.members[0] is attn.q_proj
    assert mlp.gate_proj._fast_group is mlp.up_proj._fast_group is not None
    assert attn.o_proj._fast_group is None and mlp.down_proj._fast_group is None
    torch.manual_seed(0)
    parts = [group.take(m, x, "default")[0] for m in group.members]
    torch.manual_seed(0)
    dropped, _ = drop(x, 0.5)
    for member, part in zip(group.members, parts):
        torch.testing.assert_close(part, dropped @ member.lora_A["default"].weight.t())
    assert not group._pending and group._input is None  # nothing held after the last sibling


def test_mask_law():
    """Drop probability round(p * 2^16) / 2^16, survivors scaled by its exact 1/(1-p): unbiased."""
    torch.manual_seed(0)
    x = torch.ones(2000, 1000)
    for p in (0.05, 0.1, 0.5):
        dropped, scale = drop(x, p)
        kept = dropped.mean().item()
        assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 2**-16
        assert abs(scale * (1 - round(p * 2**16) / 2**16) - 1) < 1e-12
        assert set(dropped.unique().tolist()) <= {0.0, 1.0}
    assert drop(x, 0.0)[0] is x


def test_training_curves_match_in_distribution(tiny_model_dir):
    """Shared masks change which elements are dropped together, not the law of each: the loss after some steps
    at a high dropout is the same within the seed-to-seed spread."""
    batch = packed_batch()

    def curve(fast: bool, seed: int) -> float:
        m = module(tiny_model_dir, fast, dropout=0.2)
        opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=3e-3)
        for step in range(12):
            torch.manual_seed(seed * 100 + step)
            losses, _ = m.token_losses(batch)
            losses.mean().backward()
            opt.step()
            opt.zero_grad()
        m.model.eval()
        with torch.no_grad():
            return m.token_losses(batch)[0].mean().item()

    fast = torch.tensor([curve(True, s) for s in range(3)])
    plain = torch.tensor([curve(False, s) for s in range(3)])
    spread = max(fast.std().item(), plain.std().item(), 1e-3)
    assert abs(fast.mean().item() - plain.mean().item()) < 4 * spread + 0.02 * plain.mean().item()


def test_compile_layers_compiles_every_decoder_layer_and_nothing_else(tiny_model_dir):
    """REGAModule(compile_layers=True): each decoder layer is torch.compile'd once the model is built (compiled at
    its first call, not here); off by default, and saved with the other settings."""
    compiled = REGAModule(model=ModelConfig(name_or_path=str(tiny_model_dir)), compile_layers=True)
    compiled.configure_model()
    layers = compiled.model.get_base_model().get_decoder().layers
    assert len(layers) > 0 and all(layer._compiled_call_impl is not None for layer in layers)
    assert compiled.hparams["compile_layers"] is True
    plain = module(tiny_model_dir, True)
    assert all(m._compiled_call_impl is None for m in plain.model.modules())
    assert plain.hparams["compile_layers"] is False
