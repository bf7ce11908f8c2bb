"""torch.compile(fullgraph=True) of Transformer MBLMs: no graph breaks (a break fails the
compile), forward + backward run on CPU and equal eager."""

from __future__ import annotations

import pytest
import torch

from mblm import MBLM, MBLMModelConfig, MBLMReturnType, TransformerBlock

# "aot_eager" traces exactly what inductor would get (dynamo's full graph, AOT autograd with
# fake tensors and functionalization: the parts that can break) without generating C++, which
# takes about a minute per model on 2 cores; the inductor runs are marked slow.
BACKENDS = [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.slow),
]


def _block(pos, rot=True, flash=False):
    return TransformerBlock(
        attn_head_dims=4,
        attn_num_heads=2,
        attn_use_rot_embs=rot,
        pos_emb_type=pos,
        use_flash_attn=flash,
    )


CASES = {
    "2stage": dict(
        hidden_dims=[16, 8],
        seq_lens=[6, 4],
        num_layers=[1, 1],
        block=[_block("fixed"), _block("rope", flash=True)],
        length=21,
    ),
    "3stage": dict(
        hidden_dims=[16, 12, 8],
        seq_lens=[3, 4, 2],
        num_layers=[1, 1, 1],
        block=[_block("fixed"), _block(None, rot=False), _block("rope")],
        length=19,
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_forward_backward_equals_eager(name, backend, request):
    if backend == "inductor" and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("inductor codegen is slow here; select with -m slow")
    case = dict(CASES[name])
    length = case.pop("length")
    torch.manual_seed(0)
    cfg = MBLMModelConfig(num_tokens=30, pad_token_id=0, train_checkpoint_chunks=None, **case)
    model = MBLM(cfg)
    ids = torch.randint(1, 30, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, length, generator=torch.Generator().manual_seed(2))

    def step(m):
        model.zero_grad(set_to_none=True)
        loss, logits = m(ids, return_type=MBLMReturnType.LOSS_LOGITS, loss_mask=mask)
        loss.backward()
        return loss.detach(), logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_e, logits_e, grads_e = step(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss_c, logits_c, grads_c = step(compiled)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for n, g in grads_e.items():
        if g is None:
            assert grads_c[n] is None, n
        else:
            torch.testing.assert_close(grads_c[n], g, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        hidden_c = compiled(ids, return_type=MBLMReturnType.HIDDEN_STATE)
        hidden_e = model(ids, return_type=MBLMReturnType.HIDDEN_STATE)
    torch.testing.assert_close(hidden_c, hidden_e, rtol=1e-5, atol=1e-5)


def test_compiled_memory_saving_training_equals_eager():
    """Training with checkpoint chunks (recomputed embeddings, global stage and per-chunk
    losses) compiles to one graph too."""
    case = dict(CASES["3stage"])
    length = case.pop("length")
    torch.manual_seed(0)
    cfg = MBLMModelConfig(num_tokens=30, pad_token_id=0, train_checkpoint_chunks=[2, 3], **case)
    model = MBLM(cfg).train()
    ids = torch.randint(1, 30, (2, length), generator=torch.Generator().manual_seed(1))

    def step(m):
        model.zero_grad(set_to_none=True)
        loss = m(ids, return_type=MBLMReturnType.LOSS)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_e, grads_e = step(model)
    torch._dynamo.reset()
    loss_c, grads_c = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for n, g in grads_e.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-4, atol=1e-5, msg=n)
