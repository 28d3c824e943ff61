"""Times the Triton kernels' block configurations at the 7B's shapes on a GPU, beside cuBLAS
for the matrix products: what the defaults of `engine.kernels.decode_attention` (ATTN_CONFIG),
`engine.kernels.ring_attention` (ring_config) and the product calibration's candidates are
chosen from.
Prints a table per kernel and writes JSON; never fails on time."""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch


def _time_us(fn, n: int = 20) -> float:
    """Microseconds per call, replayed as a CUDA graph (as the tick runs and as the linear
    calibration times its candidates)."""
    from engine.kernels.products.calibration import _time

    for _ in range(2):
        fn()
    return _time(lambda i: fn(), n) * 1e3


def _report(name: str, rows: list[tuple[str, float]], nbytes: int | None = None, top: int = 6) -> list[dict]:
    rows = sorted(rows, key=lambda r: r[1])
    print(f"{name}:")
    for label, us in rows[:top]:
        bw = f"  {nbytes / us / 1e3:7.0f} GB/s" if nbytes else ""
        print(f"  {us:8.2f} us{bw}  {label}")
    return [{"config": label, "us": us} for label, us in rows]


def attention(B: int, L: int, out: dict) -> None:
    from engine.kernels.decode_attention import decode_attention_triton

    H, D, W = 32, 128, 3000
    S = B + 1
    k = torch.randn(S, H, W, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(B, device="cuda")
    lengths = torch.full((B,), L, device="cuda")
    rows = []
    for bn, warps, stages, ns in itertools.product((64, 128, 256), (4, 8), (3,), (None, 1, 4, 16)):
        try:
            us = _time_us(lambda: decode_attention_triton(q, k, v, slots, lengths, nsplit=ns,
                                                          config=(bn, warps, stages)))
        except Exception as e:  # noqa: BLE001 - a configuration this GPU cannot run
            print(f"  skip {(bn, warps, stages, ns)}: {type(e).__name__}")
            continue
        rows.append((f"BLOCK_N={bn} warps={warps} stages={stages} nsplit={ns or 'auto'}", us))
    out[f"decode_attention B={B} L={L}"] = _report(f"decode attention B={B} L={L}", rows, 2 * B * H * L * D * 2)


def ring(B: int, out: dict) -> None:
    from engine.kernels.ring_attention import ring_chunk_attention_triton

    H, D, W, T = 8, 64, 250, 2
    k = torch.randn(B + 1, H, W, D, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(B, T, H, D, device="cuda")
    slots = torch.arange(B, device="cuda")
    end = torch.full((B,), 1000, device="cuda")
    rows = []
    for block, warps, splits in itertools.product((16, 32, 64, 128, 256), (1, 2, 4, 8), (1, 2, 4, 8)):
        if splits > 1 and block * splits > 2 * W:
            continue
        rows.append((f"BLOCK_W={block} warps={warps} splits={splits}",
                     _time_us(lambda: ring_chunk_attention_triton(q, k, v, slots, end, config=(block, warps, splits)))))
    out[f"ring_chunk_attention B={B}"] = _report(f"Mimi ring attention B={B}", rows, 2 * B * T * H * W * D * 4)


def linears(out: dict) -> None:
    import torch.nn.functional as F

    from engine.kernels.products import calibration as L
    from engine.quant import quantize_rows

    # the depformer's (qkv, out, ffn in, ffn out, heads, input) and the temporal attention output
    shapes = [(3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816), (2048, 1024), (1024, 4096), (4096, 4096)]
    for rows_n, (N, Kd) in itertools.product((1, 8), shapes):
        x = torch.randn(rows_n, Kd, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16) / Kd ** 0.5
        w8, s8 = quantize_rows(w)
        nbytes = w.numel() * 2
        rows = [("cuBLAS bf16", _time_us(lambda: F.linear(x, w)))]
        rows8 = []
        for i in L._candidates(rows_n):
            kind, cfg = L.CONFIGS[i]
            if rows_n <= L.SMALL_ROWS:
                rows.append((f"bf16 {kind} {cfg}", _time_us(lambda: L._run(i, x, w))))
            rows8.append((f"fp8 {kind} {cfg}", _time_us(lambda: L._run(i, x, w8, s8))))
        key = f"linear rows={rows_n} N={N} K={Kd}"
        out[key] = _report(key + " bf16", rows, nbytes, top=3) + _report(key + " fp8", rows8, nbytes // 2, top=3)


def sampling(out: dict) -> None:
    """The sampler (one program per row) at the text and audio vocabularies, per warp count, and
    without its top-k passes (not a valid sampler: what the radix select costs)."""
    from engine.kernels.common import pow2
    from engine.kernels.sampling import _sample_kernel, sample_warps

    for B, V in itertools.product((1, 64), (2048, 32000)):
        logits = torch.randn(B, V, device="cuda", dtype=torch.bfloat16)
        temp = torch.full((B,), 0.8, device="cuda")
        topk = torch.full((B,), 250 if V == 2048 else 25, device="cuda", dtype=torch.long)
        greedy = torch.zeros(B, device="cuda", dtype=torch.bool)
        seed = torch.arange(B, device="cuda")
        counter = torch.zeros(B, device="cuda", dtype=torch.long)
        tok = torch.empty(B, device="cuda", dtype=torch.long)
        block = pow2(V)
        rows = []
        for warps, passes in itertools.product((2, 4, 8, 16) if V <= 4096 else (4, 8, 16, 32), (8, 0)):
            def run():
                _sample_kernel[(B,)](logits, temp, topk, greedy, seed, counter, tok, tok, tok, V, V, 1, 0, 0, 7,
                                       BLOCK=block, FORCED=False, PASSES=passes, PDL=False, num_warps=warps)
            try:
                rows.append((f"warps={warps} passes={passes}", _time_us(run)))
            except Exception as e:  # noqa: BLE001 - a configuration this GPU cannot run
                print(f"  skip warps={warps}: {type(e).__name__}")
        out[f"sample B={B} V={V}"] = _report(f"sampling B={B} V={V} (default warps {sample_warps(block)})",
                                             rows, top=12)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="attention,ring,linear,sample")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    only = set(args.only.split(","))
    out: dict = {"card": torch.cuda.get_device_name()}
    print(out["card"])
    if "attention" in only:
        for B, L in ((1, 3000), (32, 3000), (32, 200)):
            attention(B, L, out)
    if "ring" in only:
        for B in (1, 32):
            ring(B, out)
    if "linear" in only:
        linears(out)
    if "sample" in only:
        sampling(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
