"""The shape-level ceiling of a training step, and where a profiled step's time goes.

Ceiling: the time this CPU (or GPU) needs for the model's own matrix products at the shapes a training step
uses, and nothing else. For each forward/backward pass of T tokens (sequences t_1..t_k, h LM-head positions):
  - every frozen linear [T x in] @ [in x out] forward, and its activation gradient [T x out] @ [out x in]
    backward (none for the first layer's q/k/v, whose input needs no gradient);
  - every LoRA branch: X @ A^T, (XA) @ B^T forward; dB = dY^T @ XA, d(XA) = dY @ B, dA = d(XA)^T @ X and
    dX = d(XA) @ A backward (dX not for the first layer's q/k/v);
  - causal attention fwd + bwd of each sequence at its own length, per layer (PyTorch's SDPA: the faster of its
    compute-dtype and float32 kernels at that length);
  - the LM head on the h positions: [h x H] @ [H x V] forward, [h x V] @ [V x H] backward.
Each product is timed alone in the compute dtype (best of 3 windows) on a grid of sizes and interpolated
linearly between grid points. Left out on purpose: element-wise work (norms, rotary, SiLU, residual adds,
dropout, the softmax/cross-entropy over the vocabulary), dtype casts and the optimizer step. The sum is what
a perfect implementation with these kernels would need: a step time can only approach it.
"""
from __future__ import annotations

import bisect
import time
from collections import defaultdict

TOKEN_GRID = [8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
ATTN_GRID = [8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048]


def _timed(fn, device: str, window: float = 0.03, windows: int = 3) -> float:
    """Best over `windows` of the mean seconds per call within a window of at least `window` seconds."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(windows):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if device == "cuda":
                sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= window:
                break
        best = min(best, elapsed / calls)
    return best


class Ceiling:
    """Interpolated times of one model's products; `pass_seconds` adds them up for one pass."""

    def __init__(self, shapes: dict, dtype_name: str, device: str = "cpu"):
        """`shapes`: layers, linear {name: [in, out]}, lora {name: [in, out, r]}, heads, kv_heads, head_dim,
        vocab, hidden, first_layer_inputs (modules whose input is the embedding output in layer 0)."""
        self.s, self.dtype_name, self.device = shapes, dtype_name, device
        self.cache: dict = {}

    # -- single products
    def _mm_time(self, m: int, k: int, n: int) -> float:
        """[m x k] @ [k x n] in the compute dtype."""
        key = ("mm", m, k, n)
        if key not in self.cache:
            import torch
            import torch.nn.functional as F

            dtype = getattr(torch, self.dtype_name)
            a = torch.randn(m, k, device=self.device).to(dtype)
            b = torch.randn(n, k, device=self.device).to(dtype)  # F.linear's layout: weight [out, in]
            self.cache[key] = _timed(lambda: F.linear(a, b), self.device)
        return self.cache[key]

    def _attn_time(self, t: int) -> float:
        key = ("attn", t)
        if key not in self.cache:
            import torch
            import torch.nn.functional as F

            s = self.s
            times = []
            for name in dict.fromkeys([self.dtype_name, "float32"]):
                dtype = getattr(torch, name)
                q = torch.randn(1, s["heads"], t, s["head_dim"], device=self.device, dtype=dtype, requires_grad=True)
                k = torch.randn(1, s["kv_heads"], t, s["head_dim"], device=self.device, dtype=dtype, requires_grad=True)
                v = torch.randn(1, s["kv_heads"], t, s["head_dim"], device=self.device, dtype=dtype, requires_grad=True)
                g = torch.randn(1, s["heads"], t, s["head_dim"], device=self.device, dtype=dtype)
                gqa = s["heads"] != s["kv_heads"]

                def fwd_bwd():
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                    out.backward(g)
                times.append(_timed(fwd_bwd, self.device))
            self.cache[key] = min(times)
        return self.cache[key]

    def _interp(self, fn, x: int, grid: list[int], power: int) -> float:
        """fn at x, linear between the grid points around it (beyond the grid: its last point times
        (x / last) ** power)."""
        if x <= 0:
            return 0.0
        if x in grid:
            return fn(x)
        i = bisect.bisect_left(grid, x)
        if i == 0:
            return fn(grid[0]) * x / grid[0]
        if i == len(grid):
            return fn(grid[-1]) * (x / grid[-1]) ** power
        lo, hi = grid[i - 1], grid[i]
        return fn(lo) + (fn(hi) - fn(lo)) * (x - lo) / (hi - lo)

    def mm(self, m: int, k: int, n: int) -> float:
        """Interpolated along m (the token dimension)."""
        return self._interp(lambda mm_: self._mm_time(mm_, k, n), m, TOKEN_GRID, 1)

    def attention(self, t: int) -> float:
        return self._interp(self._attn_time, t, ATTN_GRID, 2)  # quadratic in length

    # -- one pass
    def pass_seconds(self, lengths: list[int], head_positions: int) -> dict[str, float]:
        """Seconds per product family for one forward + backward pass over sequences of `lengths`."""
        s, T = self.s, sum(lengths)
        layers, first = s["layers"], set(s.get("first_layer_inputs", []))
        out: dict[str, float] = defaultdict(float)
        for name, (i, o) in s["linear"].items():
            out["linear"] += layers * self.mm(T, i, o)
            out["linear"] += (layers - (name in first)) * self.mm(T, o, i)
        for name, (i, o, r) in s["lora"].items():
            fwd = self.mm(T, i, r) + self.mm(T, r, o)
            bwd = self.mm(o, T, r) + self.mm(T, o, r) + self.mm(r, T, i)
            out["lora"] += layers * (fwd + bwd) + (layers - (name in first)) * self.mm(T, r, i)
        out["attention"] = layers * sum(self.attention(t) for t in lengths)
        if head_positions:
            out["lm_head"] = (self.mm(head_positions, s["hidden"], s["vocab"])
                              + self.mm(head_positions, s["vocab"], s["hidden"]))
        return dict(out)


def model_shapes(peft_model) -> dict:
    """What `Ceiling` needs from a PEFT-wrapped causal LM: one decoder layer's linear and LoRA shapes."""
    from torch import nn

    lm = peft_model.get_base_model()
    c = lm.config
    layers = lm.model.layers
    linear, lora = {}, {}
    for name, module in layers[0].named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear) and hasattr(module, "lora_A"):
            short = name.rsplit(".", 1)[-1]
            linear[short] = [base.in_features, base.out_features]
            a = next(iter(module.lora_A.values()))
            lora[short] = [base.in_features, base.out_features, a.out_features]
        elif isinstance(module, nn.Linear) and "lora_" not in name and not name.endswith("base_layer"):
            linear[name.rsplit(".", 1)[-1]] = [module.in_features, module.out_features]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    head = lm.get_output_embeddings().weight
    return {"layers": len(layers), "linear": linear, "lora": lora, "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads, "head_dim": head_dim,
            "vocab": head.shape[0], "hidden": head.shape[1], "first_layer_inputs": ["q_proj", "k_proj", "v_proj"]}


def step_ceilings(ceiling: Ceiling, steps: list[list[dict]]) -> list[dict[str, float]]:
    """Per step: seconds per product family, summed over its passes ({"tokens": [...], "head": h} each)."""
    out = []
    for passes in steps:
        total: dict[str, float] = defaultdict(float)
        for p in passes:
            for family, seconds in ceiling.pass_seconds(p["lengths"], p["head"]).items():
                total[family] += seconds
        out.append(dict(total))
    return out


# --------------------------------------------------------------------------- profile breakdown

CATEGORIES = [  # (category, op-name test), first match wins; applied to each op's self time
    ("matmul", lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_matmul")
     or "gemm" in n),
    ("attention", lambda n: "scaled_dot_product" in n or "flash_attention" in n),
    ("LM head softmax / cross-entropy", lambda n: "log_softmax" in n or "nll_loss" in n or n == "aten::argmax"),
    ("dropout masks", lambda n: n in ("aten::bernoulli_", "aten::random_", "aten::randint", "aten::uniform_")),
    ("dtype casts and copies", lambda n: n in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("element-wise and reductions", lambda n: n.startswith("aten::")),
]


def profile_breakdown(prof, steps: int) -> dict[str, float]:
    """Seconds per step by category from a torch.profiler run over `steps` optimizer steps. Optimizer ops are
    those under the optimizer's step; 'outside ops' is profiled wall time not in any op (Python, autograd)."""
    totals: dict[str, float] = defaultdict(float)
    events = prof.events()
    tops = [e for e in events if e.cpu_parent is None]
    for e in events:
        if not e.name.startswith("aten::") and "gemm" not in e.name and "flash" not in e.name:
            continue
        anc, in_optimizer = e.cpu_parent, False
        while anc is not None:
            if anc.name.startswith("Optimizer.step"):
                in_optimizer = True
                break
            anc = anc.cpu_parent
        self_s = e.self_cpu_time_total / 1e6
        if in_optimizer:
            totals["optimizer step"] += self_s
            continue
        for category, test in CATEGORIES:
            if test(e.name):
                totals[category] += self_s
                break
    in_ops = sum(totals.values())
    wall = sum(e.cpu_time_total for e in tops if e.name.startswith("ProfilerStep")) / 1e6
    if not wall:
        wall = sum(e.cpu_time_total for e in tops) / 1e6
    totals["outside ops (Python, autograd engine, profiler)"] = max(0.0, wall - in_ops)
    return {k: v / steps for k, v in totals.items()} | {"wall": wall / steps}
