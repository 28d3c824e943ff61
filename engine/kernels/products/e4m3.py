"""e4m3 weights in the products: their values as the activation dtype, and when the fast way
applies.

The compiler converts e4m3 to bfloat16 through float16 (cvt e4m3x2 -> f16x2, then f16 -> f32 ->
bf16). Moving the bits instead (the sign, exponent and mantissa of an e4m3 value land where a
bfloat16's are, the exponent biased by 120 less) and one bf16x2 multiply by 2^120 per two
values gives the same value exactly, subnormals included (bf16x2 multiplies keep them). The
small-batch product, which feeds tl.dot, decodes its tiles of W so on Hopper and later. The
one-row product keeps the compiler's conversion to float32, which its multiply-adds take
directly. The encodings 0x7f and 0xff (e4m3fn's NaN) decode to +-480; `quant` never stores
them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


@triton.jit
def e4m3_as(w, act: tl.constexpr, FAST: tl.constexpr):
    """w in the dtype act (e4m3 -> bf16 or another activation dtype is exact); FAST (an e4m3 w,
    act bfloat16, a Hopper GPU) by moving bits, two values a register (prmt's selectors 0x9180
    / 0xB3A2: bytes 0 and 1 / 2 and 3, each sign-extended to 16 bits)."""
    if FAST:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, c;
            mov.b32 c, 0x7B807B80;
            prmt.b32 a, $2, 0, 0x9180; shl.b32 a, a, 4; and.b32 a, a, 0x87F087F0; mul.rn.bf16x2 $0, a, c;
            prmt.b32 b, $2, 0, 0xB3A2; shl.b32 b, b, 4; and.b32 b, b, 0x87F087F0; mul.rn.bf16x2 $1, b, c;
            }""",
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        return w.to(act)


def fast_e4m3(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the small-batch product decodes W by moving bits (`e4m3_as`'s FAST): an e4m3 W,
    bfloat16 rows, a GPU with bf16x2 multiplies (Hopper and later), not the interpreter."""
    return (w.dtype == FP8 and x.dtype == torch.bfloat16 and w.is_cuda
            and torch.cuda.get_device_capability(w.device)[0] >= 9)


def linear_e4m3_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x . W8^T) * scale, float32 accumulation, in x's dtype (scale per output channel)."""
    return (F.linear(x.float(), w8.float()) * scale.float()).to(x.dtype)
