"""Compiles the tick's Triton kernels for a Hopper GPU (sm_90) ahead of time, with no GPU: the
variants the engine launches (one-row products with each prologue, the few-row and small-batch
products in float32, bf16 and e4m3, the sampler at both vocabularies, PDL on and off). The
interpreter that runs the kernels on the CPU does not compile them, so a kernel that only
fails in the compiler would otherwise pass every CPU test.

    python tests/compile_check.py      (without TRITON_INTERPRET; prints one line per variant)
"""
from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels.codebook_sum import _codebook_sum_kernel  # noqa: E402
from engine.kernels.conv_input import _conv_input_kernel  # noqa: E402
from engine.kernels.decode_attention import _attn_split_kernel  # noqa: E402
from engine.kernels.elu import _elu_kernel  # noqa: E402
from engine.kernels.layer_norm import _scale_add_ln_kernel  # noqa: E402
from engine.kernels.overlap_add import _overlap_add_kernel  # noqa: E402
from engine.kernels.products.one_row import _one_row_kernel  # noqa: E402
from engine.kernels.products.rows import _rows_linear_kernel, _split_sum_kernel  # noqa: E402
from engine.kernels.ring_attention import _ring_chunk_attn_kernel  # noqa: E402
from engine.kernels.rope import _qkv_rope_write_kernel  # noqa: E402
from engine.kernels.rvq_step import _rvq_step_kernel  # noqa: E402
from engine.kernels.sampling import _sample_kernel, sample_warps  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _rope_sig(act: str, ring: str) -> dict:
    i32 = "i32"
    return dict(qkv_ptr=act, pos_ptr="*i64", slot_ptr="*i64", ridx_ptr="*i64", q_ptr=act, k_ring=ring, v_ring=ring,
                freq_ptr="*fp32", ks_ptr="*fp32", vs_ptr="*fp32", tbl_ptr="*i64", s_b=i32, s_h=i32, sq_b=i32,
                sq_h=i32, sr_slot=i32, sr_h=i32, sr_w=i32, ss_slot=i32, ss_h=i32, st_slot=i32, HD=i32, PER=i32, W=i32)


def _kv_pages(kind: str, quant: bool):
    """The temporal transformer's KV-cache kernels over pages of 128 (bf16, or e4m3 with scales)."""
    ring = "*fp8e4nv" if quant else "*bf16"
    if kind == "rope":
        return _qkv_rope_write_kernel, _rope_sig("*bf16", ring), dict(HALF=64, QUANT=quant, RIDX=True, PAGE=128,
                                                                     PDL=True), (1, 1)
    i32 = "i32"
    sig = dict(q_ptr="*bf16", k_ring=ring, v_ring=ring, slot_ptr="*i64", len_ptr="*i64", o_ptr="*fp32",
               m_ptr="*fp32", l_ptr="*fp32", ks_ptr="*fp32", vs_ptr="*fp32", tbl_ptr="*i64", sq_b=i32, sq_h=i32,
               sr_slot=i32, sr_h=i32, sr_w=i32, ss_slot=i32, ss_h=i32, st_slot=i32, H=i32, CHUNK=i32, scale="fp32")
    return _attn_split_kernel, sig, dict(D=128, BLOCK_N=128, NSPLIT=4, QUANT=quant, PAGE=128, PDL=True), (4, 3)


def _one_row(w="*bf16", scaled=False, pro=0, delta=0, d=1, steps=1, pdl=True, cfg=(8, 256, 4, 3), vec=0):
    sig = dict(x_ptr="*bf16", w_ptr=w, s_ptr="*fp32" if scaled else "*bf16", y_ptr="*bf16", N="i32", K="i32",
               swn="i32", d_ptr="*bf16", id_ptr="*i64", a_ptr="*bf16", xo_ptr="*bf16", eps="fp32", sdm="i32",
               step="i32")
    const = dict(BLOCK_N=cfg[0], BLOCK_K=cfg[1], SCALED=scaled, PRO=pro, HAS_DELTA=delta, D=d, STEPS=steps, PDL=pdl,
                 VEC=vec)
    return _one_row_kernel, sig, const, cfg[2:]


def _rows(x="*bf16", w="*bf16", fma=False, m=16, scaled=False, pdl=True, gelu=False, cfg=(16, 256, 4, 3),
          fast8=False, y=None, m_fast=False):
    sig = dict(x_ptr=x, w_ptr=w, s_ptr="*fp32" if scaled else x, y_ptr=y or x, M="i32", N="i32", K="i32", sxm="i32",
               swn="i32", sym="i32", KC="i32")
    const = dict(BLOCK_M=m, BLOCK_N=cfg[0], BLOCK_K=cfg[1], SCALED=scaled, IEEE=x == "*fp32", FMA=fma, GELU=gelu,
                 PDL=pdl, FAST8=fast8, M_FAST=m_fast)
    return _rows_linear_kernel, sig, const, cfg[2:]


def _sample(logits="*bf16", block=2048, passes=8, forced=False, pdl=True):
    sig = dict(logits_ptr=logits, temp_ptr="*fp32", topk_ptr="*i64", greedy_ptr="*i1", seed_ptr="*i64",
               counter_ptr="*i64", out_ptr="*i64", forced_ptr="*i64", fmask_ptr="*i1", V="i32", stride="i32",
               out_stride="i32", f_stride="i32", fm_stride="i32", stream_mix="i64")
    const = dict(BLOCK=block, FORCED=forced, PASSES=passes, PDL=pdl)
    return _sample_kernel, sig, const, (sample_warps(block), 1)


def _codec(name, act=True, fresh=False, ks=1):
    i32 = "i32"
    if name == "conv input":
        sig = dict(x_ptr="*fp32", tail_ptr="*fp32", slot_ptr="*i64", fresh_ptr="*i1", out_ptr="*fp32", C=i32, T=i32,
                   TAIL=i32, NU=i32, STRIDE=i32, DIL=i32, sxb=i32, sxc=i32, sxt=i32, sts=i32, stc=i32, sob=i32, sou=i32,
                   soc=i32)
        const = dict(ACT=act, FRESH=fresh, KS=ks, BLOCK_C=8, BLOCK_T=64, TAIL_P=8, PDL=True)
        return _conv_input_kernel, sig, const, (4, 1)
    if name == "overlap-add":
        sig = dict(y_ptr="*fp32", part_ptr="*fp32", slot_ptr="*i64", bias_ptr="*fp32", out_ptr="*fp32", C=i32, T=i32,
                   S=i32, syb=i32, syt=i32, syc=i32, sps=i32, spc=i32, sob=i32, soc=i32, sot=i32)
        return _overlap_add_kernel, sig, dict(HAS_BIAS=True, BLOCK_C=16, BLOCK_T=128, S_P=8, PDL=True), (4, 1)
    if name == "codebook sum":
        sig = dict(code_ptr="*i64", tab_ptr="*fp32", sc_ptr="*fp32", out_ptr="*fp32", NCB=i32, BINS=i32, D=i32, K=i32,
                   scb=i32, sck=i32)
        return _codebook_sum_kernel, sig, dict(BLOCK_D=128, K_P=4, PDL=True), (4, 1)
    if name == "ring attention":
        sig = dict(q_ptr="*fp32", k_ring="*fp32", v_ring="*fp32", slot_ptr="*i64", end_ptr="*i64", o_ptr="*fp32",
                   po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", sq_b=i32, sq_t=i32, sq_h=i32, sr_slot=i32,
                   sr_h=i32, sr_w=i32, W=i32, H=i32, T=i32, CHUNK=i32, scale="fp32")
        return _ring_chunk_attn_kernel, sig, dict(D=64, BLOCK_W=32, NSPLIT=8, PDL=True), (2, 1)
    if name == "elu":
        sig = dict(x_ptr="*fp32", y_ptr="*fp32", n=i32, C=i32, T=i32, sxb=i32, sxc=i32, sxt=i32, syb=i32, syc=i32,
                   syt=i32)
        return _elu_kernel, sig, dict(BLOCK=1024, PDL=True), (4, 1)
    if name == "rope":   # Mimi's rings: no page table
        return _qkv_rope_write_kernel, _rope_sig("*fp32", "*fp32"), dict(HALF=32, QUANT=False, RIDX=False, PAGE=0,
                                                                        PDL=True), (1, 1)
    if name == "layer norm":
        sig = dict(x_ptr="*fp32", d_ptr="*fp32", s_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32", xo_ptr="*fp32",
                   y_ptr="*fp32", N=i32, eps="fp32", sx=i32, sd=i32, sxo=i32, sy=i32)
        return _scale_add_ln_kernel, sig, dict(HAS_DELTA=True, NORM=True, BLOCK=512, RN_MUL=True, PDL=True), (4, 1)
    sig = dict(x_ptr="*fp32", s_ptr="*fp32", n_ptr="*fp32", cb_ptr="*fp32", xo_ptr="*fp32", code_ptr="*i64", N=i32,
               D=i32, sx=i32, ss=i32, sxo=i32, scode=i32)
    return _rvq_step_kernel, sig, dict(BLOCK_N=2048, BLOCK_D=256, PDL=True), (8, 1)


VARIANTS = {
    "one row plain": _one_row(),
    "one row plain, no PDL": _one_row(pdl=False),
    "one row norm": _one_row(pro=1, cfg=(4, 1024, 4, 3)),
    "one row residual + norm": _one_row(pro=1, delta=1, cfg=(2, 1024, 4, 4)),
    "one row embedding + norm": _one_row(pro=1, delta=2, cfg=(8, 1024, 8, 3)),
    "one row silu": _one_row(pro=2, cfg=(4, 512, 4, 3)),
    "one row add": _one_row(pro=3, delta=1),
    "one row step attention": _one_row(pro=4, d=64, steps=8, cfg=(4, 1024, 4, 3)),
    "one row e4m3": _one_row(w="*fp8e4nv", scaled=True, pro=1, delta=1),
    "one row e4m3, runs of 8": _one_row(w="*fp8e4nv", scaled=True, pro=1, delta=1, vec=8),
    "one row e4m3 silu, runs of 8": _one_row(w="*fp8e4nv", scaled=True, pro=2, cfg=(4, 1024, 4, 3), vec=8),
    "one row e4m3 step attention, runs of 8": _one_row(w="*fp8e4nv", scaled=True, pro=4, d=64, steps=8, cfg=(4, 1024, 4, 3),
                                                 vec=8),
    "few rows float32": _rows("*fp32", "*fp32", fma=True, m=2, cfg=(4, 512, 4, 3)),
    "few rows bf16": _rows(fma=True, m=4, cfg=(16, 128, 4, 3)),
    "few rows e4m3": _rows(w="*fp8e4nv", fma=True, m=4, scaled=True, cfg=(8, 256, 4, 3)),
    "small batch e4m3": _rows(w="*fp8e4nv", m=64, scaled=True, cfg=(64, 128, 4, 3)),
    "small batch e4m3, decoded by moving bits": _rows(w="*fp8e4nv", m=64, scaled=True, cfg=(64, 128, 4, 3),
                                                      fast8=True),
    "small batch e4m3, one row in 16, larger tiles": _rows(w="*fp8e4nv", m=16, scaled=True, cfg=(128, 256, 8, 3),
                                                           fast8=True),
    "small batch e4m3, K split: the partial sums": _rows(w="*fp8e4nv", x="*bf16", m=64, cfg=(32, 256, 4, 3),
                                                         fast8=True, y="*fp32"),
    "small batch e4m3, K split: their sum": (_split_sum_kernel, dict(p_ptr="*fp32", s_ptr="*fp32", y_ptr="*bf16",
                                                                       MN="i32", N="i32"),
                                             dict(SPLITS=4, SCALED=True, BLOCK=1024, PDL=True), (4, 1)),
    "a prefill's rows against e4m3, blocks of 128 rows first": _rows(w="*fp8e4nv", m=128, scaled=True,
                                                                     cfg=(128, 64, 8, 3), fast8=True, m_fast=True),
    "small batch bf16": _rows(m=32, cfg=(32, 256, 4, 3)),
    "small batch float32": _rows("*fp32", "*fp32", m=16),
    "sampler, audio": _sample(),
    "sampler, text": _sample(block=32768),
    "sampler, float32 teacher-forced": _sample("*fp32", block=2048, passes=16, forced=True, pdl=False),
    "Mimi's convolution input": _codec("conv input"),
    "Mimi's downsampling input, fresh streams": _codec("conv input", act=False, fresh=True),
    "Mimi's convolution columns": _codec("conv input", ks=7),
    "Mimi's downsampling columns, fresh streams": _codec("conv input", act=False, fresh=True, ks=4),
    "Mimi's overlap-add": _codec("overlap-add"),
    "Mimi's residual VQ step": _codec("rvq"),
    "Mimi's ring attention, split": _codec("ring attention"),
    "Mimi's codebook sum": _codec("codebook sum"),
    "Mimi's feed-forward input with its GELU": _rows("*fp32", "*fp32", fma=True, m=2, gelu=True, cfg=(4, 512, 4, 3)),
    "Mimi's ELU, strided": _codec("elu"),
    "Mimi's rope and ring write, chunks of positions": _codec("rope"),
    "Mimi's scale-add LayerNorm": _codec("layer norm"),
    "KV pages: rope and write, bf16": _kv_pages("rope", False),
    "KV pages: rope and write, e4m3": _kv_pages("rope", True),
    "KV pages: decode attention, bf16": _kv_pages("attention", False),
    "KV pages: decode attention, e4m3": _kv_pages("attention", True),
}


def main() -> int:
    failed = 0
    for name, (fn, sig, const, (warps, stages)) in VARIANTS.items():
        full = {**sig, **{k: "constexpr" for k in const}}
        assert list(full) == fn.arg_names, (name, fn.arg_names)
        src = ASTSource(fn=fn, signature=full, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        t = time.perf_counter()
        try:
            triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
            print(f"ok   {name} ({time.perf_counter() - t:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
