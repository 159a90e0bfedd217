"""Compile-time cost of the attention pass on the graph of a 12-layer hand-written GPT (CPU).

    python benchmarks/pass_time.py
Prints the median time of normalize and of the attention pass over several runs (target: pass <= 100 ms), and
of the compile-time part of the builds ahead (passes/build_ahead.py: stand-ins, mask values, mask
recognition; the calls are made as on the interpreter's CPU tensors, so no build is queued).
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from demo import Block  # noqa: E402

import flashfuse  # noqa: E402,F401
from flashfuse.config import Config  # noqa: E402
from flashfuse.passes import PassContext, build_ahead, get_pass  # noqa: E402
from flashfuse.passes.normalize import to_aten  # noqa: E402
from flashfuse.report import GraphReport  # noqa: E402


class GPT(nn.Module):
    def __init__(self, layers=12, n_embd=768, n_head=12):
        super().__init__()
        self.blocks = nn.ModuleList(Block(n_embd, n_head, 1024, 0.1) for _ in range(layers))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


def main():
    graphs = []

    def capture(gm, ex):
        graphs.append((gm, ex))
        return gm.forward

    model = GPT().train()
    x = torch.randn(1, 64, 768)
    torch.compile(model, backend=capture)(x)
    gm, ex = graphs[0]
    t_norm, t_pass, t_ahead, n = [], [], [], 0
    for _ in range(5):
        t0 = time.perf_counter()
        aten_gm = to_aten(gm, ex)
        t1 = time.perf_counter()
        ctx = PassContext(Config(remainder="eager"), GraphReport(0), ex, False)
        n = get_pass("attention")(aten_gm, ctx)
        t2 = time.perf_counter()
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"  # the calls count as the interpreter's: stand-ins, values, recognition
        try:
            build_ahead.start(aten_gm, ex)
        finally:
            if before is None:
                os.environ.pop("TRITON_INTERPRET")
            else:
                os.environ["TRITON_INTERPRET"] = before
        t3 = time.perf_counter()
        t_norm.append(t1 - t0)
        t_pass.append(t2 - t1)
        t_ahead.append(t3 - t2)
    res = {"graph_nodes": len(aten_gm.graph.nodes), "attention_fused": n,
           "normalize_ms": 1e3 * statistics.median(t_norm), "attention_pass_ms": 1e3 * statistics.median(t_pass),
           "build_ahead_ms": 1e3 * statistics.median(t_ahead), "torch": torch.__version__}
    print(json.dumps(res, indent=2))
    out = os.path.join(os.path.dirname(__file__), "results", "pass_time.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
