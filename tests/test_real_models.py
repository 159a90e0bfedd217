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


def _hf(config_name, model_name, norm, skipped_because=None, attention=LAYERS, **kw):
    """A tiny HF model with eager attention, from its config class (no weights downloaded).
    `skipped_because`: the note of a graph flashfuse must leave alone (nothing fused, eager's numbers);
    `attention`: the attention layers it has."""
    def factory():
        cfg = getattr(transformers, config_name)(attn_implementation="eager", **kw)
        return getattr(transformers, model_name)(cfg), {norm: 1}
    factory.__name__ = model_name
    factory.skipped_because = skipped_because
    factory.attention = attention
    return factory


# more architectures as they ship (a hidden set for the attention pass: layouts, masks and norms differ)
_MORE_HF = [
    # BLOOM: heads folded into the batch (baddbmm + views), and a custom autograd.Function GELU (fused in training
    # mode once its backward is proven GELU's, passes/bias_gelu_function.py)
    _hf("BloomConfig", "BloomModel", "layer_norm", vocab_size=101, hidden_size=32, n_layer=LAYERS, n_head=4),
    _hf("OPTConfig", "OPTModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
    _hf("MistralConfig", "MistralModel", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
    _hf("Qwen2Config", "Qwen2Model", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
    _hf("GemmaConfig", "GemmaModel", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, intermediate_size=64, max_position_embeddings=64),
    _hf("FalconConfig", "FalconModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4),
    _hf("T5Config", "T5EncoderModel", "rms_norm", vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
        num_heads=4),
    _hf("DistilBertConfig", "DistilBertModel", "layer_norm", vocab_size=101, dim=32, n_layers=LAYERS, n_heads=4,
        hidden_dim=64, max_position_embeddings=64),
    _hf("GPTNeoXConfig", "GPTNeoXModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    _hf("PhiConfig", "PhiModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    _hf("GPTJConfig", "GPTJModel", "layer_norm", vocab_size=101, n_embd=32, n_layer=LAYERS, n_head=4,
        n_positions=64, rotary_dim=4),
    _hf("Starcoder2Config", "Starcoder2Model", "layer_norm", vocab_size=101, hidden_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=64),
    _hf("AlbertConfig", "AlbertModel", "layer_norm", vocab_size=101, embedding_size=16, hidden_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    # encoder self-attention, decoder self-attention (causal) and cross-attention (Nq != Nk masks)
    _hf("BartConfig", "BartModel", "layer_norm", attention=3 * LAYERS, vocab_size=101, d_model=32,
        encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
    _hf("CLIPTextConfig", "CLIPTextModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    # local (sliding window) and global layers
    _hf("GPTNeoConfig", "GPTNeoModel", "layer_norm", vocab_size=101, hidden_size=32, num_layers=LAYERS,
        num_heads=4, max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=8),
    _hf("MptConfig", "MptModel", "layer_norm", vocab_size=101, d_model=32, n_layers=LAYERS, n_heads=4,
        max_seq_len=64),  # ALiBi
    _hf("DebertaV2Config", "DebertaV2Model", "layer_norm", vocab_size=101, hidden_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    _hf("OlmoConfig", "OlmoModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    _hf("Phi3Config", "Phi3Model", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        pad_token_id=0),
    # sliding-window layers and logit soft-capping
    _hf("Gemma2Config", "Gemma2Model", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
        sliding_window=8),
    _hf("CohereConfig", "CohereModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        pad_token_id=0),
    _hf("BioGptConfig", "BioGptModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    # scores 3-D (bmm) -> 4-D (mask, torch.max against finfo.min) -> 3-D for the softmax
    _hf("XGLMConfig", "XGLMModel", "layer_norm", vocab_size=101, d_model=32, num_layers=LAYERS, attention_heads=4,
        ffn_dim=64, max_position_embeddings=64),
    # session 4: multi-query attention (one K/V head folded into the rows)
    _hf("GPTBigCodeConfig", "GPTBigCodeModel", "layer_norm", vocab_size=101, n_embd=32, n_layer=LAYERS, n_head=4,
        n_positions=64, multi_query=True, bos_token_id=0, eos_token_id=0),
    # RMSNorm of q and k per head before RoPE
    _hf("Qwen3Config", "Qwen3Model", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64),
    # sliding-window and global layers, q/k norms
    _hf("Gemma3TextConfig", "Gemma3TextModel", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
        sliding_window=8),
    # mixture of experts: the router's softmax goes to topk, a named near-miss, not an attention
    _hf("MixtralConfig", "MixtralModel", "rms_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2),
    # partial rotary, LayerNorm of q and k
    _hf("PersimmonConfig", "PersimmonModel", "layer_norm", vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    # relative positions (content and position streams summed into the scores)
    _hf("XLNetConfig", "XLNetModel", "layer_norm", vocab_size=101, d_model=32, n_layer=LAYERS, n_head=4, d_inner=64),
    # attention through 1x1 convolutions
    _hf("SqueezeBertConfig", "SqueezeBertModel", "layer_norm", vocab_size=101, hidden_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, embedding_size=32,
        max_position_embeddings=64),
    # pooled queries between blocks (Nq != Nk), relative shift; two blocks and a decoder layer
    # local attention over blocks: rank-5 scores (batch, blocks, heads, block, 3 * block)
    _hf("LongT5Config", "LongT5EncoderModel", "rms_norm", vocab_size=101, d_model=32, d_kv=8, d_ff=64,
        num_layers=LAYERS, num_heads=4, local_radius=4),
    _hf("FunnelConfig", "FunnelModel", "layer_norm", attention=3, vocab_size=101, d_model=32, n_head=4, d_head=8,
        d_inner=64, block_sizes=[1, 1], num_decoder_layers=1),
]


def _first_tensor(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None \
        else out.logits


@pytest.mark.parametrize("factory", [_bert, _gpt2, _llama, *_MORE_HF],
                         ids=["bert", "gpt2", "llama_gqa", *[f.__name__ for f in _MORE_HF]])
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

    skipped = getattr(factory, "skipped_because", None)
    if skipped:
        assert report.count("attention") == 0, str(report)
        assert any(skipped in n for g in report.graphs for n in g.notes), str(report)
    else:
        assert report.count("attention") == getattr(factory, "attention", LAYERS), str(report)
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


# ------------------------------------------------------------------------------------------------
# nanoGPT-style and ViT-style models written here (timm/torchvision would pull another torch build)
# ------------------------------------------------------------------------------------------------
import math  # noqa: E402

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class _NanoBlock(nn.Module):
    def __init__(self, c=32, h=4, block=32):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.h = h
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=67, c=32, layers=LAYERS):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(32, c)
        self.blocks = nn.ModuleList(_NanoBlock(c) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c)
        self.head = nn.Linear(c, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class _ViTBlock(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.heads, self.scale = heads, (dim // heads) ** -0.5

    def forward(self, x):
        B, N, C = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = x + self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim=32, layers=LAYERS, patch=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(_ViTBlock(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize("factory, make_input", [
    (NanoGPT, lambda: torch.randint(0, 67, (2, 19))),
    (ViT, lambda: torch.randn(2, 3, 16, 16)),
], ids=["nanogpt", "vit"])
def test_handwritten_models_fused_and_equal_to_eager(factory, make_input):
    torch.manual_seed(0)
    model = factory().eval()
    x = make_input()
    report = flashfuse.testing.assert_fused(model, x, options={"remainder": "eager"}, attention=LAYERS,
                                            layer_norm=2 * LAYERS + 1)
    assert report.count("attention") == LAYERS
    flashfuse.testing.assert_close_to_eager(model, x, grads=True, options={"remainder": "eager"})


@pytest.mark.parametrize("factory", [_gpt2, _llama], ids=["gpt2", "llama_gqa"])
def test_hf_causal_mask_runs_as_minus_inf(factory, monkeypatch):
    """HF causal LMs add `where(causal, 0, finfo.min)` to the scores. No row is all fill when Nq <= Nk, so the
    kernels run it as -inf (codegen.fills_as_masks): the blocks above the diagonal are skipped, not computed
    and filled. Checked on the score modification the kernels receive, with and without a padding mask of
    ones (recognised at run time as no padding)."""
    from flashfuse.kernels.attention import score_mod as sm
    from flashfuse.kernels.attention import triton_impl
    seen = []  # the score modification of each kernel module loaded
    real = triton_impl.load_module

    def record(text, *args, **kwargs):
        seen.append(str(sm.from_text(text)))
        return real(text, *args, **kwargs)
    monkeypatch.setattr(triton_impl, "load_module", record)
    monkeypatch.setattr(triton_impl, "_PLANS", {})  # plans of earlier tests would skip the call
    torch.manual_seed(0)
    model, _ = factory()
    compiled = torch.compile(model.eval(), backend=flashfuse.backend(remainder="eager"))
    ids = torch.randint(1, 101, (2, 12))
    for mask in (None, torch.ones(2, 12, dtype=torch.long)):
        seen.clear()
        with torch.no_grad():
            out = _first_tensor(compiled(input_ids=ids, attention_mask=mask))
            ref = _first_tensor(model(input_ids=ids, attention_mask=mask))
        assert seen and all("-oo" in t and "3.40282" not in t for t in seen), seen
        assert (out - ref).norm() / ref.norm() < 1e-4
    report = flashfuse.explain(model, input_ids=ids)  # and the report says so
    assert str(report).count("its huge fill runs as -inf at Nq=12, Nk=12") == LAYERS, str(report)
    # with padding, causal and padding come as one (B, 1, N, N) mask: right padding splits into causal by index
    # (-oo, skipped blocks) and a row of kept keys; left padding leaves rows with no key, and the mask as it is
    for left, split in ((False, True), (True, False)):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, slice(0, 3) if left else slice(9, 12)] = 0
        seen.clear()
        with torch.no_grad():
            out = _first_tensor(compiled(input_ids=ids, attention_mask=mask))
            ref = _first_tensor(model(input_ids=ids, attention_mask=mask))
        assert seen and all(("-oo" in t) == split for t in seen), (left, seen)
        keep = mask.bool()[..., None].expand_as(ref)
        assert (out - ref)[keep].norm() / ref[keep].norm() < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_training_mode_fuses_attention_dropout(arch):
    """Training mode with attention dropout: the dropout is drawn inside the fused op (one op per layer,
    p in its description), and a step is reproducible under torch.manual_seed."""
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                      attn_implementation="eager", attn_pdrop=0.1)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                       attn_implementation="eager", attention_dropout=0.1)
        model = transformers.LlamaForCausalLM(cfg)
    model.train()
    ids = torch.randint(1, 101, (2, 12))
    report = Report()
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager"))
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        _active.append(report)
        try:
            loss = compiled(input_ids=ids, labels=ids).loss
        finally:
            _active.pop()
        loss.backward()
        losses.append(loss.item())
    fused = [m for m in report.matches if m.fusion == "attention"]
    assert len(fused) == LAYERS and all("dropout p=0.1" in str(m) for m in fused), str(report)
    assert losses[0] == losses[1] and torch.isfinite(torch.tensor(losses)).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _hf_vision(config_name, model_name, attention, inputs, **kw):
    def factory():
        cfg = getattr(transformers, config_name)(attn_implementation="eager", **kw)
        return getattr(transformers, model_name)(cfg), inputs()
    factory.__name__ = model_name
    factory.attention = attention
    return factory


def _image():
    return (torch.randn(2, 3, 32, 32),)  # pixel_values


_VISION_AUDIO = [
    # shifted windows: a mask per window and a relative position bias table
    _hf_vision("SwinConfig", "SwinModel", 4, _image, image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
               num_heads=[2, 4], window_size=4),
    _hf_vision("BeitConfig", "BeitModel", LAYERS, _image, image_size=32, patch_size=8, hidden_size=32,
               num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, use_relative_position_bias=True),
    _hf_vision("Dinov2Config", "Dinov2Model", LAYERS, _image, image_size=32, patch_size=8, hidden_size=32,
               num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2),
    # keys and values from a spatially reduced sequence: Nq != Nk
    _hf_vision("SegformerConfig", "SegformerModel", 2, _image, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
               hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2]),
    _hf_vision("Wav2Vec2Config", "Wav2Vec2Model", LAYERS, lambda: (torch.randn(2, 400),),
               hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, conv_dim=(8, 8),
               conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2),
]


@pytest.mark.parametrize("factory", _VISION_AUDIO, ids=[f.__name__ for f in _VISION_AUDIO])
def test_hf_vision_and_audio_models_fused_and_equal_to_eager(factory):
    from flashfuse.testing import assert_close_to_eager, assert_fused

    torch.manual_seed(0)
    model, inputs = factory()
    model.eval()
    options = {"remainder": "eager"}
    assert_fused(model, *inputs, options=options, attention=factory.attention)
    # element-wise, through convolutions and several attention layers: fp32 reassociation reaches ~2e-5
    # on single gradient elements (Swin's patch embedding; the norm-wise error there is 3e-7)
    assert_close_to_eager(model, *inputs, options=options, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_keeps_the_fusions(reentrant):
    """`model.gradient_checkpointing_enable()`: every layer a checkpointed region. The attention inside each is
    fused (pipeline.rewrite_checkpoint_bodies; before, the checkpoint made the whole graph unfusable), and the
    loss and the gradients equal eager's."""
    model, _ = _gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # checkpointing runs only in training mode (dropout is 0 in this config)
    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(5))
    test_model = copy.deepcopy(model)
    report = Report()
    compiled = torch.compile(test_model, backend=flashfuse.backend(remainder="eager"))
    _active.append(report)
    try:
        loss = compiled(input_ids=ids, labels=ids).loss
    finally:
        _active.pop()
    ref = model(input_ids=ids, labels=ids).loss
    assert report.count("attention") == LAYERS, str(report)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    for (name, p), q in zip(test_model.named_parameters(), model.parameters()):
        if q.grad is not None:
            assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm() + 1e-7, name
