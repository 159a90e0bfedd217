"""Training-step benchmark (issue 7, H100). Milliseconds per step (median after warm-up) and peak memory
for eager, Inductor, flashfuse and, as the bar, Inductor on the same model with F.scaled_dot_product_attention;
also the compile (warm-up) time and the longest sequence that trains at batch 1. All bf16 autocast, fused AdamW.
  --model gpt2   GPT-2 small, hand-written causal attention (masked_fill on a tril buffer), dropout 0.1
  --model bert   BERT-large-style encoder (transformers, eager attention) with padding masks
  --model llama  LLaMA-style GQA decoder (transformers, eager attention); llama_pad: with right padding

    python benchmarks/train_gpt.py --out DIR [--model gpt2] [--configs 8x1024,2x4096] [--modes eager,inductor,flashfuse,sdpa]
    python benchmarks/train_gpt.py --out DIR --longest 16384,32768,65536 [--shared-mask]
Writes DIR/train_MODEL.json + .png (and DIR/train_MODEL_longest.json) and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout, sdpa, tril=None):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout, self.sdpa = n_head, n_embd, dropout, sdpa
        if tril is not None:  # one bool buffer for all layers (GPT(shared_mask=True))
            self.register_buffer("bias", tril, persistent=False)
        elif not sdpa:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size),
                                 persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout, sdpa, tril=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout, sdpa, tril)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT. `shared_mask`: the layers share one bool tril buffer instead of a float one each (nanoGPT's):
    the same spelling, 1/48 of the memory. Twelve float buffers are 12 x 4 x T^2 bytes: 206 GB at T = 65536,
    more than any GPU (and this host) has, so the longest-sequence runs use the shared one."""

    def __init__(self, vocab=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.1, sdpa=False,
                 shared_mask=False):
        super().__init__()
        tril = None
        if shared_mask and not sdpa:
            tril = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)).view(1, 1, block_size, block_size)
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size, dropout, sdpa, tril) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def hf_model(name, t, sdpa, tiny=False):
    """BERT-large-style encoder (padding masks) or LLaMA-style GQA decoder from transformers configs (no
    weight downloads); eager attention unless `sdpa` (the by-hand bar)."""
    import transformers

    attn = "sdpa" if sdpa else "eager"
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=30522, hidden_size=64 if tiny else 1024, num_hidden_layers=2 if tiny else 24,
            num_attention_heads=4 if tiny else 16, intermediate_size=128 if tiny else 4096,
            max_position_embeddings=max(512, t), attn_implementation=attn)
        return transformers.BertForMaskedLM(cfg), 30522
    if name in ("llama", "llama_pad"):
        cfg = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=64 if tiny else 2048, num_hidden_layers=2 if tiny else 16,
            num_attention_heads=4 if tiny else 32, num_key_value_heads=1 if tiny else 8,
            intermediate_size=128 if tiny else 5632, max_position_embeddings=max(2048, t),
            attn_implementation=attn, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg), 32000
    raise ValueError(f"unknown model {name!r}: gpt2, bert, llama or llama_pad")


def make_step(mode, b, t, device="cuda", model_name="gpt2", tiny=False, dropout=0.1, shared_mask=False,
              norm_policy="auto"):
    """One training step (forward, backward, fused AdamW) of `model_name` compiled as `mode`. `shared_mask`:
    GPT-2 with one bool tril buffer for all layers (GPT's docstring)."""
    torch.manual_seed(0)
    sdpa = mode == "sdpa"
    if model_name == "gpt2":
        # with a shared buffer, built in place: .to(device) would copy it once per layer
        with torch.device(device) if shared_mask else contextlib.nullcontext():
            model = (GPT(block_size=t, n_layer=2, n_head=4, n_embd=64, sdpa=sdpa, dropout=dropout,
                         shared_mask=shared_mask) if tiny
                     else GPT(block_size=t, sdpa=sdpa, dropout=dropout, shared_mask=shared_mask))
        vocab = 50304
    else:
        model, vocab = hf_model(model_name, t, sdpa, tiny)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    if mode in ("inductor", "sdpa"):
        fwd = torch.compile(model)
    elif mode == "flashfuse":
        if norm_policy == "auto":
            fwd = torch.compile(model, backend="flashfuse")
        else:  # which norms flashfuse replaces under Inductor (Config.norm_policy)
            import flashfuse
            fwd = torch.compile(model, backend=flashfuse.backend(norm_policy=norm_policy))
    elif mode == "flashfuse-eager":  # flashfuse's kernels, everything else eager (quick to compile)
        import flashfuse
        fwd = torch.compile(model, backend=flashfuse.backend(remainder="eager"))
    elif mode == "flashfuse-cg":  # CUDA graphs: no host overhead per kernel launch
        fwd = torch.compile(model, backend="flashfuse", mode="reduce-overhead")
    elif mode == "inductor-cg":
        fwd = torch.compile(model, mode="reduce-overhead")
    else:
        fwd = model
    idx = torch.randint(0, vocab, (b, t), device=device)
    tgt = torch.randint(0, vocab, (b, t), device=device)
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    mask[b // 2:, -(t // 8):] = 0  # right padding in half of the batch (BERT, llama_pad)

    def loss_of():
        if model_name == "gpt2":
            return fwd(idx, tgt)
        if model_name == "bert":
            return fwd(input_ids=idx, attention_mask=mask, labels=tgt).loss
        if model_name == "llama_pad":  # right padding: the causal & padding mask the kernels split
            return fwd(input_ids=idx, attention_mask=mask, labels=idx).loss
        return fwd(input_ids=idx, labels=idx).loss

    def step(marks=None):
        """One step; `marks`, if given, gets the host clock after the forward and after the backward."""
        if mode.endswith("-cg"):
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_of()
        if marks is not None:
            marks.append(time.perf_counter())
        loss.backward()
        if marks is not None:
            marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def measure(mode, b, t, iters=10, model_name="gpt2", dropout=0.1, shared_mask=False, norm_policy="auto"):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = make_step(mode, b, t, model_name=model_name, dropout=dropout, shared_mask=shared_mask,
                     norm_policy=norm_policy)
    t0 = time.perf_counter()
    parts = []  # per warm-up step: seconds to the forward's return (compiles), to the backward's, to the step's end
    for _ in range(3):
        marks = [time.perf_counter()]
        loss = float(step(marks))  # read now: a CUDA-graph output is overwritten by the next replay
        marks.append(time.perf_counter())
        parts.append([round(b_ - a_, 2) for a_, b_ in zip(marks, marks[1:])])
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    # "ms": steps back to back as a training loop runs them (the host queues the next step while the GPU
    # works), median over windows of `window` steps; "ms_synced": one step at a time with a sync after each
    # (the figure of sessions 1-2), which also charges the host's head start of every step.
    window, windows = 5, max(3, iters // 5)
    per_step = []
    for _ in range(windows):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(window):
            step()
        e.record()
        torch.cuda.synchronize()
        per_step.append(s.elapsed_time(e) / window)
    synced = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        synced.append(s.elapsed_time(e))
    return {"model": model_name, "mode": mode, "b": b, "t": t, "dropout": dropout, "shared_mask": shared_mask,
            "norm_policy": norm_policy,
            "ms": statistics.median(per_step), "ms_synced": statistics.median(synced), "warmup_s": warm,
            "warmup_steps_s": parts,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss}


def plot(rows, env, path, model="gpt2"):
    """Bars: ms/step and peak GiB per mode, one group per b x seq."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    cfgs = sorted({(r["b"], r["t"]) for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ms", "ms / training step"), (axes[1], "peak_gib", "peak memory (GiB)")):
        w = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            ys = [next((r.get(key) or 0 for r in rows if r["mode"] == mode and (r["b"], r["t"]) == c), 0)
                  for c in cfgs]
            ax.bar([j + i * w for j in range(len(cfgs))], ys, w, label=mode)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cfgs))], [f"{b} x {t}" for b, t in cfgs])
        ax.set_ylabel(label)
    axes[0].legend()
    title = {"gpt2": "GPT-2 small", "bert": "BERT-large-style", "llama": "LLaMA-style GQA",
             "llama_pad": "LLaMA-style GQA, right padding"}.get(model, model)
    fig.suptitle(f"{title} training step, bf16 autocast — {env['device']}, torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--configs", default="8x1024,2x4096")
    ap.add_argument("--modes", default="eager,inductor,flashfuse,sdpa")
    ap.add_argument("--longest", default="")
    ap.add_argument("--model", default="gpt2", help="gpt2 (hand-written nanoGPT), bert (HF, padding), llama (HF, GQA), "
                    "llama_pad (llama with right padding)")
    ap.add_argument("--dropout", type=float, default=0.1, help="GPT-2's dropout (attention, residual, MLP)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--shared-mask", action="store_true",
                    help="GPT-2: one bool tril buffer for all layers (nanoGPT's twelve float ones are 206 GB at 65536)")
    ap.add_argument("--norm-policy", choices=["auto", "always", "never"], default="auto",
                    help="flashfuse mode: which norms flashfuse replaces under Inductor (Config.norm_policy)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if args.longest:
        rows = []
        for t in (int(x) for x in args.longest.split(",")):
            for mode in args.modes.split(","):
                try:
                    r = measure(mode, 1, t, iters=3, model_name=args.model, dropout=args.dropout,
                                shared_mask=args.shared_mask, norm_policy=args.norm_policy)
                except torch.OutOfMemoryError as exc:
                    r = {"mode": mode, "b": 1, "t": t, "ms": None, "peak_gib": None, "oom": True,
                         "error": str(exc)[:200]}
                rows.append(r)
                print(json.dumps(r), flush=True)
                torch._dynamo.reset()
        json.dump({"env": env, "rows": rows}, open(os.path.join(args.out, f"train_{args.model}{args.tag}_longest.json"), "w"), indent=1)
        return
    rows = []
    for cfg in args.configs.split(","):
        b, t = (int(x) for x in cfg.split("x"))
        for mode in args.modes.split(","):
            try:
                r = measure(mode, b, t, model_name=args.model, dropout=args.dropout, shared_mask=args.shared_mask,
                            norm_policy=args.norm_policy)
            except torch.OutOfMemoryError as exc:
                r = {"mode": mode, "b": b, "t": t, "ms": None, "peak_gib": None, "oom": True,
                     "error": str(exc)[:200]}
            except Exception as exc:  # one failing mode must not lose the other rows
                r = {"mode": mode, "b": b, "t": t, "ms": None, "peak_gib": None,
                     "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
            torch._dynamo.reset()
    json.dump({"env": env, "rows": rows}, open(os.path.join(args.out, f"train_{args.model}{args.tag}.json"), "w"), indent=1)
    plot(rows, env, os.path.join(args.out, f"train_{args.model}{args.tag}.png"), args.model)
    print(f"\n{env}\n| b x seq | mode | ms/step | ms/step, synced each step | peak GiB | warm-up s |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.1f}" if r.get("ms") else ("OOM" if r.get("oom") else "error")
        synced = f"{r['ms_synced']:.1f}" if r.get("ms_synced") else "-"
        pk = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        print(f"| {r['b']} x {r['t']} | {r['mode']} | {ms} | {synced} | {pk} | {r.get('warmup_s', 0):.1f} |")


if __name__ == "__main__":
    main()
