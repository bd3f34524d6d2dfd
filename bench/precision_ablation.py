"""Where a bf16 forward pass of the test model loses accuracy: each rounding point on or off.

    PYTHONPATH=platform python bench/precision_ablation.py --model DIR [--prompts 8] [--new 32]

A simulator of the decoder in float32 in which every place a bf16 implementation may round an
activation to bf16 is a switch. Weights are the checkpoint's bf16 values (exact in float32);
a GEMM rounds its input to bf16 and accumulates in float32, as bf16 tensor-core GEMMs do. With
every switch off it is the float32 model; with the switches of the engine's reference path on it
is that path (up to accumulation order). Each configuration is scored against float32 on the
same teacher-forced token sequences (random prompts, then float32-greedy continuations): the
relative error ||x - ref|| / ||ref|| over all logits of the generated positions, and greedy
agreement there. "order" re-runs a configuration with every GEMM split in two halves summed
the other way: a second implementation with the same roundings and another accumulation order,
which is what the fast path is to the reference path.

Rounding points (True in the engine before 2026-11-25):
  res      residual stream held in bf16: every residual add rounds (2 per layer)
  norm_mid RMSNorm rounds x * rstd to bf16 before the weight (HF's order)
  branch   o_proj / down_proj outputs rounded before they are added to the residual
  gu       gate/up GEMM output rounded before SiLU
  silu     SiLU rounded before the multiply with up
  qkv      q/k/v GEMM outputs rounded (k, v are what a bf16 KV cache holds anyway)
  rope     RoPE: cos/sin tables in bf16, x*cos and rot(x)*sin each rounded
  p        softmax probabilities rounded to bf16 before P @ V (flash attention does)
  logits   LM-head output rounded to bf16 before the caller's .float()
Always rounded (the bf16 GEMMs' inputs): the normed hidden states, the attention output, the
SiLU * up product, and q/k after RoPE (the KV cache and the attention kernel's operands).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

POINTS = ("res", "norm_mid", "branch", "gu", "silu", "qkv", "rope", "p", "logits")
CURRENT = dict.fromkeys(POINTS, True) | {"inputs": True, "probe": None}
EXACT = dict.fromkeys(POINTS, False) | {"inputs": False, "probe": None}
INHERENT = EXACT | {"inputs": True}


def bf(t: torch.Tensor, on: bool = True) -> torch.Tensor:
    return t.to(torch.bfloat16).float() if on else t


class Sim:
    def __init__(self, folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        self.cfg = cfg
        self.w: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118
                    self.w[name] = f.get_tensor(name).float()
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            self.w[p + "qkv"] = torch.cat(
                [self.w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            )
            self.w[p + "gu"] = torch.cat(
                [self.w.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
            )
        theta = cfg["rope_parameters"]["rope_theta"]
        dim = cfg["head_dim"]
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
        self.split = False

    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = bf(x, self.inputs)  # a bf16 GEMM's input
        if not self.split:
            return x @ w.T
        k = x.shape[-1] // 2
        return x[:, k:] @ w[:, k:].T + x[:, :k] @ w[:, :k].T

    def norm(self, x: torch.Tensor, w: torch.Tensor, f: dict) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])
        return bf(bf(y, f["norm_mid"]) * w, f["inputs"])

    def forward(self, ids: list[int], f: dict) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        self.inputs = f["inputs"]
        heads, kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        n = len(ids)
        pos = torch.arange(n).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = bf(emb.cos(), f["rope"]), bf(emb.sin(), f["rope"])

        def rope(x: torch.Tensor) -> torch.Tensor:
            rot = torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1)
            r = f["rope"]
            return bf(bf(x * cos[:, None], r) + bf(rot * sin[:, None], r), f["inputs"])

        mask = torch.ones(n, n, dtype=torch.bool).tril()
        res = w["model.embed_tokens.weight"][torch.tensor(ids)]
        x = None
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            if x is not None:
                res = bf(res + x, f["res"])
            if f["probe"] == i:  # one bf16 rounding of the residual entering layer i, alone
                res = bf(res)
            h = self.norm(res, w[p + "input_layernorm.weight"], f)
            qkv = bf(self.mm(h, w[p + "qkv"]), f["qkv"])
            q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], -1)
            q, k = rope(q.view(n, heads, dim)), rope(k.view(n, kv, dim))
            v = v.view(n, kv, dim)
            k = k.repeat_interleave(heads // kv, 1)
            v = v.repeat_interleave(heads // kv, 1)
            s = torch.einsum("qhd,khd->hqk", q, k) * dim**-0.5
            prob = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
            denom = None
            if f["p"]:  # flash style: unnormalised exp rounded, the sum kept in float32
                e = torch.exp(s.masked_fill(~mask, float("-inf")) - s.max(-1, keepdim=True)[0])
                denom = e.sum(-1, keepdim=True)
                prob = bf(e)
            o = torch.einsum("hqk,khd->qhd", prob, v)
            if denom is not None:
                o = o / denom.permute(1, 0, 2)
            o = bf(o, f["inputs"]).reshape(n, heads * dim)
            x = bf(self.mm(o, w[p + "self_attn.o_proj.weight"]), f["branch"])
            res = bf(res + x, f["res"])
            h = self.norm(res, w[p + "post_attention_layernorm.weight"], f)
            gu = bf(self.mm(h, w[p + "gu"]), f["gu"])
            g, u = gu.chunk(2, -1)
            a = bf(torch.nn.functional.silu(g), f["silu"])
            x = bf(self.mm(bf(a * u, f["inputs"]), w[p + "mlp.down_proj.weight"]), f["branch"])
        res = bf(res + x, f["res"])
        h = self.norm(res, w["model.norm.weight"], f)
        return bf(self.mm(h, w["lm_head.weight"]), f["logits"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--configs", default="all")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    folder = Path(args.model)
    rng = random.Random(1)
    prompts = [
        [rng.randrange(10, 32000) for _ in range(rng.randint(16, 200))] for _ in range(args.prompts)
    ]
    cache = folder / f"greedy-{args.prompts}x{args.new}.json"
    if cache.exists():
        outputs = json.loads(cache.read_text())
    else:
        from deepflow.engine.llm import LLM
        from deepflow.engine.sampling_params import SamplingParams

        llm = LLM(str(folder), dtype="float32", num_kv_blocks=512)
        params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs = [o.outputs[0].token_ids for o in outs]
        cache.write_text(json.dumps(outputs))
        del llm
    sim = Sim(folder)

    def score(f: dict, split: bool = False) -> torch.Tensor:
        sim.split = split
        rows = []
        for p, o in zip(prompts, outputs, strict=True):
            logits = sim.forward(p + o, f)
            rows.append(logits[len(p) - 1 : len(p) - 1 + len(o)])
        return torch.cat(rows)

    t0 = time.perf_counter()
    truth = score(EXACT)
    print(f"float32 pass {time.perf_counter() - t0:.0f} s", flush=True)
    top1 = torch.softmax(truth, -1).max(-1).values
    print(f"{len(truth)} positions; median top-1 probability {float(top1.median()):.3f}")

    def compare(x: torch.Tensor, y: torch.Tensor) -> str:
        rel = float((x - y).double().norm() / y.double().norm())
        med = float(((x - y).norm(dim=-1) / y.norm(dim=-1)).median())
        agree = float((x.argmax(-1) == y.argmax(-1)).double().mean())
        return f"{rel:.2e} | {med:.2e} | {100 * agree:.1f}%"

    configs: list[tuple[str, dict, bool]] = [("current (all rounding points on)", CURRENT, True)]
    configs += [(f"current, {pt} off", CURRENT | {pt: False}, False) for pt in POINTS]
    configs += [("only GEMM inputs rounded (all points off)", INHERENT, True)]
    configs += [(f"GEMM inputs, {pt} on", INHERENT | {pt: True}, False) for pt in POINTS]
    configs += [
        (f"probe: residual into layer {i} rounded once, nothing else", EXACT | {"probe": i}, False)
        for i in (0, 1, 4, 8, 12, 15)
    ]
    proposed = INHERENT | {"qkv": True, "p": True, "branch": True, "gu": True}
    configs += [("proposed: res/norm/rope/silu/logits fp32", proposed, True)]
    configs += [
        (f"proposed, {pt} off too", proposed | {pt: False}, True)
        for pt in ("branch", "gu", "qkv", "p")
    ]
    if args.configs != "all":
        keep = args.configs.split(";")
        configs = [c for c in configs if any(k in c[0] for k in keep)]
    print("| configuration | vs float32: rel. error | median row | agree | vs itself, other "
          "GEMM order: rel. error | median row | agree |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f, order in configs:
        a = score(f)
        line = f"| {name} | {compare(a, truth)} |"
        if order:
            line += f" {compare(score(f, split=True), a)} |"
        else:
            line += " | | |"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
