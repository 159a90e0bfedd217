"""Issue 7 (CPU part): models as they ship, unchanged, compiled with backend="flashfuse": every attention
layer fused, the norms fused, outputs and gradients equal to eager, with padding masks."""
from __future__ import annotations

import copy

import pytest
import torch

import flashfuse
from flashfuse.report import Report, _active

transformers = pytest.importorskip("transformers")

LAYERS = 2


def _bert():
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="eager",
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg), {"layer_norm": 2 * LAYERS + 1}


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg), {"layer_norm": 2 * LAYERS + 1}


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg), {"rms_norm": 2 * LAYERS + 1}


def _first_tensor(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None \
        else out.logits


@pytest.mark.parametrize("factory", [_bert, _gpt2, _llama], ids=["bert", "gpt2", "llama_gqa"])
def test_hf_model_fused_and_equal_to_eager(factory):
    torch.manual_seed(0)
    model, norms = factory()
    model.eval()
    ids = torch.randint(1, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, -3:] = 0  # padding

    report = Report()
    test_model = copy.deepcopy(model)
    compiled = torch.compile(test_model, backend=flashfuse.backend(remainder="eager"))
    _active.append(report)
    try:
        out = _first_tensor(compiled(input_ids=ids, attention_mask=mask))
    finally:
        _active.pop()
    ref = _first_tensor(model(input_ids=ids, attention_mask=mask))

    assert report.count("attention") == LAYERS, str(report)
    for name, n in norms.items():
        assert report.count(name) + report.count("residual_norm") >= 1, str(report)
    keep = mask.bool()[..., None].expand_as(ref)  # padded positions: any value is fine
    rel = (out - ref)[keep].norm() / ref[keep].norm()
    assert rel < 1e-4, (rel, str(report))

    g = torch.randn_like(ref) * keep
    out.backward(g)
    ref.backward(g)
    # Some gradients are zero up to rounding (a key bias shifts every score of a row equally): compare
    # each with a relative bound plus a floor tied to the size of all gradients.
    total = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    for (name, pa), (_, pb) in zip(test_model.named_parameters(), model.named_parameters()):
        if pb.grad is None:
            continue
        assert pa.grad is not None, name
        err = (pa.grad - pb.grad).norm()
        assert err <= 1e-4 * pb.grad.norm() + 1e-6 * total, (name, err.item(), pb.grad.norm().item())
