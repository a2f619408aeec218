"""Which levers pay for a BERT-base cross-encoder on this GPU? A self-contained probe.

Random BERT-base weights (std 0.02), fp16, synthetic lengths shaped like the project's corpus.
Compares, on the same inputs and in one run:
  - padded SDPA (length-sorted, bucketed) vs packed tokens + varlen flash attention, eager and torch.compile'd;
  - batch-1 latency: eager vs CUDA graph replay (padded) at several lengths;
  - the fp16 matmul ceiling measured on this card.
Prints a table, writes JSON under $OUT (or bench/results). Correctness: packed == padded within fp16 noise.

Run on the GPU machine: python3 bench/kernels_probe.py
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

H, NH, FF, LAYERS = 768, 12, 3072, 12
HD = H // NH
DEV = "cuda"
DT = torch.float16


def make_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(DEV, DT)

    w: dict[str, torch.Tensor] = {
        "word": rnd(21128, H), "pos": rnd(512, H), "type": rnd(2, H),
        "eln_w": torch.ones(H, device=DEV, dtype=DT), "eln_b": torch.zeros(H, device=DEV, dtype=DT),
        "pool_w": rnd(H, H), "pool_b": torch.zeros(H, device=DEV, dtype=DT), "cls_w": rnd(1, H) * 50,
    }
    for i in range(LAYERS):
        w |= {
            f"{i}.qkv_w": rnd(3 * H, H), f"{i}.qkv_b": rnd(3 * H), f"{i}.o_w": rnd(H, H), f"{i}.o_b": rnd(H),
            f"{i}.ln1_w": torch.ones(H, device=DEV, dtype=DT), f"{i}.ln1_b": torch.zeros(H, device=DEV, dtype=DT),
            f"{i}.f1_w": rnd(FF, H), f"{i}.f1_b": rnd(FF), f"{i}.f2_w": rnd(H, FF), f"{i}.f2_b": rnd(H),
            f"{i}.ln2_w": torch.ones(H, device=DEV, dtype=DT), f"{i}.ln2_b": torch.zeros(H, device=DEV, dtype=DT),
        }
    return w


def ffn_block(w: dict[str, torch.Tensor], i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    x = F.layer_norm(x + F.linear(attn, w[f"{i}.o_w"], w[f"{i}.o_b"]), (H,), w[f"{i}.ln1_w"], w[f"{i}.ln1_b"], 1e-12)
    h = F.gelu(F.linear(x, w[f"{i}.f1_w"], w[f"{i}.f1_b"]))
    return F.layer_norm(x + F.linear(h, w[f"{i}.f2_w"], w[f"{i}.f2_b"]), (H,), w[f"{i}.ln2_w"], w[f"{i}.ln2_b"], 1e-12)


def head(w: dict[str, torch.Tensor], cls: torch.Tensor) -> torch.Tensor:
    pooled = torch.tanh(F.linear(cls, w["pool_w"], w["pool_b"]))
    return torch.sigmoid(F.linear(pooled, w["cls_w"]).float()).squeeze(-1)


def embed(w: dict[str, torch.Tensor], ids: torch.Tensor, pos: torch.Tensor, typ: torch.Tensor) -> torch.Tensor:
    x = w["word"][ids] + w["pos"][pos] + w["type"][typ]
    return F.layer_norm(x, (H,), w["eln_w"], w["eln_b"], 1e-12)


def forward_padded(w, ids, typ, mask):  # ids [B, L], mask [B, L] bool
    b, l = ids.shape
    pos = torch.arange(l, device=ids.device).expand(b, l)
    x = embed(w, ids, pos, typ)
    bias = torch.zeros(b, 1, 1, l, device=ids.device, dtype=x.dtype).masked_fill(~mask[:, None, None, :], -1e4)
    for i in range(LAYERS):
        qkv = F.linear(x, w[f"{i}.qkv_w"], w[f"{i}.qkv_b"]).view(b, l, 3, NH, HD).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        x = ffn_block(w, i, x, a.transpose(1, 2).reshape(b, l, H))
    return head(w, x[:, 0])


def forward_packed(w, ids, pos, typ, cu, max_len):  # ids [T]
    from torch.nn.attention.varlen import varlen_attn

    x = embed(w, ids, pos, typ)
    t = x.shape[0]
    for i in range(LAYERS):
        qkv = F.linear(x, w[f"{i}.qkv_w"], w[f"{i}.qkv_b"]).view(t, 3, NH, HD)
        a = varlen_attn(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max_len, max_len)
        x = ffn_block(w, i, x, a.reshape(t, H))
    return head(w, x[cu[:-1].long()])


def lengths_like_corpus(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.85 + math.log(30))
    return [int(min(512, max(8, v))) for v in raw.tolist()]


def timed(fn, reps: int = 5) -> float:
    """Median seconds of fn() over reps, with CUDA events."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) / 1e3)
    return sorted(out)[len(out) // 2]


def device_ms(fn, reps: int = 30) -> float:
    """Median device ms of fn() (CUDA events), for the probes that time single kernels."""
    return timed(fn, reps) * 1e3


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    sec = timed(lambda: a @ b, reps=10)
    return 2 * 8192**3 / sec


def main() -> None:
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    w = make_weights()
    lens = sorted(lengths_like_corpus(8192))
    n_pairs = len(lens)
    mean_len = sum(lens) / n_pairs
    flop_per_token = LAYERS * 2 * (4 * H * H + 2 * H * FF)
    total_flop = sum(flop_per_token * l + LAYERS * 4 * l * l * H for l in lens)
    ceiling = matmul_ceiling()
    results: dict[str, object] = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "pairs": n_pairs, "mean_len": mean_len,
        "matmul_tflops": ceiling / 1e12, "ceiling_pairs_s": n_pairs / (total_flop / ceiling),
    }
    g = torch.Generator().manual_seed(1)
    all_ids = [torch.randint(1000, 21000, (l,), generator=g) for l in lens]

    def padded_batches(bsz: int, bucket: int):
        out = []
        for s in range(0, n_pairs, bsz):
            chunk = all_ids[s:s + bsz]
            L = -(-max(len(c) for c in chunk) // bucket) * bucket
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            mask = torch.zeros(len(chunk), L, dtype=torch.bool)
            typ = torch.zeros(len(chunk), L, dtype=torch.long)
            for j, c in enumerate(chunk):
                ids[j, : len(c)] = c
                mask[j, : len(c)] = True
                typ[j, len(c) // 2: len(c)] = 1
            out.append((ids.to(DEV), typ.to(DEV), mask.to(DEV)))
        return out

    def packed_batches(max_tokens: int):
        out, cur = [], []
        for c in all_ids:
            if cur and sum(len(x) for x in cur) + len(c) > max_tokens:
                out.append(cur)
                cur = []
            cur.append(c)
        out.append(cur)
        res = []
        for chunk in out:
            ids = torch.cat(chunk)
            pos = torch.cat([torch.arange(len(c)) for c in chunk])
            typ = torch.cat([(torch.arange(len(c)) >= len(c) // 2).long() for c in chunk])
            cu = torch.zeros(len(chunk) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor([len(c) for c in chunk]).cumsum(0)
            res.append((ids.to(DEV), pos.to(DEV), typ.to(DEV), cu.to(DEV), max(len(c) for c in chunk)))
        return res

    rows = []
    with torch.inference_mode():
        # correctness: packed vs padded on the first 64 pairs
        pb = padded_batches(64, 8)[0]
        pk = packed_batches(10**9)
        ref = forward_padded(w, *pb)
        first = packed_batches(sum(lens[:64]))[0]
        got = forward_packed(w, *first)[:64]
        results["packed_vs_padded_max_abs"] = (ref - got).abs().max().item()
        del pk

        for bsz in (256, 512, 1024):
            batches = padded_batches(bsz, 16)
            sec = timed(lambda: [forward_padded(w, *b) for b in batches], reps=3)
            rows.append(("padded eager", f"B={bsz}", n_pairs / sec))
        for toks in (16384, 32768, 65536):
            batches = packed_batches(toks)
            sec = timed(lambda: [forward_packed(w, *b) for b in batches], reps=3)
            rows.append(("packed eager", f"T<={toks}", n_pairs / sec))

        try:
            t0 = time.perf_counter()
            cpk = torch.compile(forward_packed, dynamic=True)
            batches = packed_batches(32768)
            cpk(w, *batches[0])
            torch.cuda.synchronize()
            results["compile_packed_s"] = time.perf_counter() - t0
            for toks in (32768, 65536):
                batches = packed_batches(toks)
                sec = timed(lambda: [cpk(w, *b) for b in batches], reps=3)
                rows.append(("packed compiled", f"T<={toks}", n_pairs / sec))
        except Exception as exc:  # noqa: BLE001 - a probe reports what failed
            results["compile_packed_error"] = repr(exc)[:500]

        try:
            t0 = time.perf_counter()
            cpd = torch.compile(forward_padded, dynamic=True)
            batches = padded_batches(512, 16)
            cpd(w, *batches[0])
            torch.cuda.synchronize()
            results["compile_padded_s"] = time.perf_counter() - t0
            sec = timed(lambda: [cpd(w, *b) for b in batches], reps=3)
            rows.append(("padded compiled", "B=512", n_pairs / sec))
        except Exception as exc:  # noqa: BLE001
            results["compile_padded_error"] = repr(exc)[:500]

        # batch-1 latency: eager vs CUDA graph, padded path, and compiled+graph
        lat = {}
        for L in (16, 32, 64, 128):
            ids = torch.randint(1000, 21000, (1, L), device=DEV)
            typ = torch.zeros(1, L, dtype=torch.long, device=DEV)
            mask = torch.ones(1, L, dtype=torch.bool, device=DEV)
            eager = timed(lambda: forward_padded(w, ids, typ, mask), reps=50)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    forward_padded(w, ids, typ, mask)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward_padded(w, ids, typ, mask)
            replay = timed(graph.replay, reps=200)
            entry = {"eager_ms": eager * 1e3, "graph_ms": replay * 1e3}
            if "compile_padded_s" in results:
                for _ in range(3):
                    cpd(w, ids, typ, mask)
                torch.cuda.synchronize()
                g2 = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g2):
                    cpd(w, ids, typ, mask)
                entry["compiled_graph_ms"] = timed(g2.replay, reps=200) * 1e3
            lat[L] = entry
        results["batch1_latency"] = lat

    results["throughput"] = [{"variant": a, "batching": b, "pairs_s": c} for a, b, c in rows]
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("throughput", "batch1_latency")}, indent=1))
    print(f"{'variant':18} {'batching':10} {'pairs/s':>10} {'% ceiling':>9}")
    for a, b, c in rows:
        print(f"{a:18} {b:10} {c:10.0f} {100 * c / results['ceiling_pairs_s']:8.1f}%")
    for L, e in lat.items():
        print(f"batch-1 L={L}: " + ", ".join(f"{k}={v:.3f}" for k, v in e.items()))


if __name__ == "__main__":
    main()
