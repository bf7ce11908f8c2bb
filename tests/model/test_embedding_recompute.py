"""Training with checkpoint chunks recomputes cheap activations in backward (memory-saving mode).

- A global stage's embedding (LayerNorm over the patch's bytes, Linear, LayerNorm) would keep
  activations as wide as its whole patch (patch size x local dim) per patch, i.e. local-dim
  floats per input byte per global stage: the largest activations of a long-context model.
- The global stage is recomputed whole (it has no chunks).
- The local stage embeds its bytes inside its checkpointed chunks, so its float input is not kept.
- The logits and the loss are computed in chunks that are recomputed in backward.
"""

from __future__ import annotations

import pytest
import torch

from mblm import MBLM, MBLMModelConfig, MBLMReturnType

PATCH = 16 * 8
LOCAL_DIM = 24


TRANSFORMER = {
    "block_type": "transformer",
    "attn_head_dims": 8,
    "attn_num_heads": 2,
    "attn_use_rot_embs": True,
    "pos_emb_type": "fixed",
}


def _model(chunks: list[int] | None, block: str = "transformer") -> MBLM:
    global_block = (
        {"block_type": "mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8}
        if block == "mamba2"
        else TRANSFORMER
    )
    local = TRANSFORMER
    cfg = MBLMModelConfig(
        num_tokens=257,
        pad_token_id=256,
        hidden_dims=[32, 16, LOCAL_DIM],
        seq_lens=[4, 16, 8],
        num_layers=[1, 1, 1],
        train_checkpoint_chunks=chunks,
        block=[global_block, local, local],
    )
    torch.manual_seed(0)
    return MBLM(cfg).train()


def _loss_and_grads(
    model: MBLM, ids: torch.Tensor, autocast: bool = False, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, return_type=MBLMReturnType.LOSS, loss_mask=loss_mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_shapes(model: MBLM, ids: torch.Tensor) -> set[tuple[int, ...]]:
    """Shapes of the float activations autograd keeps for backward (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes: set[tuple[int, ...]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params and t.dim():
            shapes.add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, return_type=MBLMReturnType.LOSS)
    return shapes


@pytest.mark.parametrize("block", ["transformer", "mamba2"])
def test_recomputed_embeddings_give_the_same_loss_and_gradients(block):
    ids = torch.randint(0, 256, (2, 4 * PATCH - 5))
    loss_a, grads_a = _loss_and_grads(_model(None, block), ids)
    loss_b, grads_b = _loss_and_grads(_model([2, 3], block), ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_recomputation_under_autocast_and_with_a_loss_mask(monkeypatch):
    """bf16 autocast: the same chunks with and without the extra recomputation agree to bf16
    round-off (chunking itself changes bf16 sums, in the original too, so both sides chunk)."""
    ids = torch.randint(0, 256, (2, 4 * PATCH - 5))
    mask = (torch.rand(ids.shape) > 0.3).float()
    loss_b, grads_b = _loss_and_grads(_model([2, 3], "mamba2"), ids, True, mask)
    monkeypatch.setattr(MBLM, "_saving_memory", lambda self: False)
    loss_a, grads_a = _loss_and_grads(_model([2, 3], "mamba2"), ids, True, mask)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, grad in grads_a.items():
        # bf16 weight gradients summed per chunk instead of in one product: an ulp or so
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-2 * scale, msg=name)


@pytest.mark.parametrize("block", ["transformer", "mamba2"])
def test_checkpoint_chunks_keep_no_patch_wide_activation_and_no_stage_input(block):
    ids = torch.randint(0, 256, (1, 4 * PATCH))
    plain, saving = (
        _saved_shapes(_model(None, block), ids),
        _saved_shapes(_model([2, 3], block), ids),
    )
    widths = {PATCH * LOCAL_DIM, 8 * LOCAL_DIM}  # the two global stages' flattened patches
    assert widths <= {s[-1] for s in plain}
    assert not widths & {s[-1] for s in saving}
    assert 257 in {s[-1] for s in plain}  # logits (or their float32 copy for the loss)
    assert 257 not in {s[-1] for s in saving}  # recomputed in chunks in backward
    local_input = (4 * 16, 1 + 8, LOCAL_DIM)  # (patches, start + bytes, local dim)
    assert local_input in plain
    assert local_input not in saving
    # the global stage's sequences (batch 1, start + 3 or 4 patches): without recomputation its
    # layers keep many activations; recomputed, only its output (to_next_stage_proj's input) is
    in_global = {s for s in plain if s[:2] in ((1, 4), (1, 5))}
    assert len(in_global) > 1
    assert {s for s in saving if s[:2] in ((1, 4), (1, 5))} <= {(1, 4, 32), (1, 5, 32)}


def test_embeddings_are_recomputed_only_in_training():
    model = _model([2, 3])
    ids = torch.randint(0, 256, (1, 4 * PATCH))
    with torch.no_grad():
        eval_loss = model.eval()(ids, return_type=MBLMReturnType.LOSS)
    calls = []
    handle = model.token_embs_rev[2].register_forward_pre_hook(lambda *a: calls.append(1))
    model.eval()(ids, return_type=MBLMReturnType.LOSS).backward()
    handle.remove()
    assert calls == [1]  # eval: run once, never again in backward
    model.train()
    calls.clear()
    handle = model.token_embs_rev[2].register_forward_pre_hook(lambda *a: calls.append(1))
    model(ids, return_type=MBLMReturnType.LOSS).backward()
    handle.remove()
    assert calls == [1, 1]  # train with chunks: forward, then the recomputation in backward
    assert torch.isfinite(eval_loss)


@pytest.mark.parametrize("global_block", ["mamba1", "transformer"])
def test_two_stage_model_gives_the_same_loss_and_gradients(global_block):
    local = TRANSFORMER
    first = (
        {"block_type": "mamba1", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8}
        if global_block == "mamba1"
        else local
    )

    def model(chunks: list[int] | None) -> MBLM:
        cfg = MBLMModelConfig(
            num_tokens=257,
            pad_token_id=256,
            hidden_dims=[32, 16],
            seq_lens=[6, 8],
            num_layers=[1, 1],
            train_checkpoint_chunks=chunks,
            block=[first, local],
        )
        torch.manual_seed(0)
        return MBLM(cfg).train()

    ids = torch.randint(0, 257, (3, 6 * 8 - 3))  # pad ids inside the input too
    loss_a, grads_a = _loss_and_grads(model(None), ids)
    loss_b, grads_b = _loss_and_grads(model([4]), ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("return_type", [MBLMReturnType.LOGITS, MBLMReturnType.LOSS_LOGITS])
def test_logits_in_training_are_the_same(return_type):
    ids = torch.randint(0, 256, (2, 4 * PATCH - 7))
    outs = []
    for chunks in (None, [2, 3]):
        model = _model(chunks, "mamba2")
        out = model(ids, return_type=return_type)
        logits = out if return_type == MBLMReturnType.LOGITS else out[1]
        logits.square().mean().backward()
        outs.append((out, model.token_embs_rev[0].embedding.weight.grad.clone()))
    (out_a, grad_a), (out_b, grad_b) = outs
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-8)


class _CountingStage(torch.nn.Module):
    """A custom stage with a forward side effect (a call counter, like BatchNorm's statistics)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.linear(x))


def test_custom_global_stage_is_not_recomputed():
    model = _model([2, 3])
    model.stage_models[0] = _CountingStage(32)
    ids = torch.randint(0, 256, (1, 4 * PATCH))
    model(ids, return_type=MBLMReturnType.LOSS).backward()
    assert model.stage_models[0].calls == 1
