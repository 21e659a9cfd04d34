"""PTX helpers that look up eight 4-bit codes per instruction group (spec §5 weights in 4-bit containers).

A row's LUT (≤ 16 int8 levels) is held as four int32 words; `prmt` picks bytes out of two words by 3-bit
selectors, so one int32 word of packed codes (codes k..k+7, element k in the lowest nibble as in spec §5)
becomes two int32 words of int8 levels (codes k..k+3 and k+4..k+7) in 11 integer instructions:

    low  = prmt(lut0, lut1, code & 7)             levels 0..7 picked by each code's low 3 bits
    high = prmt(lut2, lut3, code & 7)             levels 8..15
    word = prmt(low, high, 0x3210 | bit 3 → +4)   per byte, low or high by the code's bit 3

instead of a mask, a lookup and a multiply-add per weight; `dp4a` then multiplies four bytes at a time
(the GEMV), or `word_slots` transposes the bytes of four words so that each register holds four int8 values
of one byte slot for the tensor cores.

The Triton interpreter cannot run inline assembly: under it (TRITON_INTERPRET=1 at import) the helpers are
plain-Triton emulations of `prmt` and `dp4a` with the same selector arithmetic, so the kernels that use them
run in the CPU tests too; the PTX itself is checked by the GPU tests (tests/test_int_gemm_gpu.py).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _decode_asm(word: str, luts: tuple[str, str, str, str], low: str, high: str) -> str:
    """PTX leaving the levels of codes 0-3 of `word` in register `low` and of codes 4-7 in `high`.

    The selectors of all eight codes are made once per word (code & 7, and 0x3210 + 4·bit 3 per byte
    through one lop3 with the constants in registers: a lop3 takes one immediate only); prmt reads the
    low 16 bits of a selector, so codes 4-7 only need it shifted."""
    lut0, lut1, lut2, lut3 = luts
    return f"""
    .reg .b32 nd_sel, nd_pick, nd_a, nd_b, nd_bit3, nd_mask, nd_base;
    and.b32 nd_sel, {word}, 0x77777777;
    shr.u32 nd_bit3, {word}, 1;
    mov.b32 nd_mask, 0x44444444;
    mov.b32 nd_base, 0x32103210;
    lop3.b32 nd_pick, nd_bit3, nd_mask, nd_base, 0xEA;
    prmt.b32 nd_a, {lut0}, {lut1}, nd_sel;
    prmt.b32 nd_b, {lut2}, {lut3}, nd_sel;
    prmt.b32 {low}, nd_a, nd_b, nd_pick;
    shr.u32 nd_sel, nd_sel, 16;
    shr.u32 nd_pick, nd_pick, 16;
    prmt.b32 nd_a, {lut0}, {lut1}, nd_sel;
    prmt.b32 nd_b, {lut2}, {lut3}, nd_sel;
    prmt.b32 {high}, nd_a, nd_b, nd_pick;"""


def _dot_asm(x_type: str) -> str:
    """PTX for dot_nibble_words: decode, then two dp4a (weights signed, activations of x_type)."""
    return ("{\n.reg .b32 nd_lo, nd_hi, nd_part;\n" + _decode_asm("$1", ("$2", "$3", "$4", "$5"), "nd_lo", "nd_hi")
            + f"\n    dp4a.s32.{x_type} nd_part, nd_lo, $6, $8;\n    dp4a.s32.{x_type} $0, nd_hi, $7, nd_part;\n}}")


# Outputs go through temporaries: an output register may share a register with an input that is still read.
_DECODE_WORDS = tl.constexpr("{\n.reg .b32 nd_lo, nd_hi;\n"
                             + _decode_asm("$2", ("$3", "$4", "$5", "$6"), "nd_lo", "nd_hi")
                             + "\n    mov.b32 $0, nd_lo;\n    mov.b32 $1, nd_hi;\n}")
_BYTE_SUM = tl.constexpr("{\n.reg .b32 nd_ones;\nmov.b32 nd_ones, 0x01010101;\ndp4a.s32.s32 $0, $1, nd_ones, 0;\n}")
_WORD_SLOTS = tl.constexpr("""{
    .reg .b32 ws_01lo, ws_01hi, ws_23lo, ws_23hi;
    prmt.b32 ws_01lo, $4, $5, 0x5140;
    prmt.b32 ws_01hi, $4, $5, 0x7362;
    prmt.b32 ws_23lo, $6, $7, 0x5140;
    prmt.b32 ws_23hi, $6, $7, 0x7362;
    prmt.b32 $0, ws_01lo, ws_23lo, 0x5410;
    prmt.b32 $1, ws_01lo, ws_23lo, 0x7632;
    prmt.b32 $2, ws_01hi, ws_23hi, 0x5410;
    prmt.b32 $3, ws_01hi, ws_23hi, 0x7632;
}""")
_DOT_SIGNED_X = tl.constexpr(_dot_asm("s32"))
_DOT_UNSIGNED_X = tl.constexpr(_dot_asm("u32"))


@triton.jit
def _decode_nibble_words_ptx(words, lut0, lut1, lut2, lut3):
    """int32 words of eight 4-bit codes → (levels of codes 0-3, levels of codes 4-7), each four int8
    levels in one int32 word (byte j = code j)."""
    return tl.inline_asm_elementwise(asm=_DECODE_WORDS, constraints="=r,=r,r,r,r,r,r",
                                     args=[words, lut0, lut1, lut2, lut3], dtype=(tl.int32, tl.int32), is_pure=True,
                                     pack=1)


@triton.jit
def _word_slots_ptx(words):
    """int32 words → four int8 tensors of the same shape, slot j holding byte j of each word. A pack-4 block
    transposes the bytes of four words (8 prmt), so each output register holds four int8 values ready for
    the tensor-core operand; every element gets a byte of its own word whichever four words a block gets."""
    return tl.inline_asm_elementwise(
        asm=_WORD_SLOTS, constraints="=r,=r,=r,=r,r,r,r,r", args=[words],
        dtype=(tl.int8, tl.int8, tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _signed_byte_sum_ptx(words):
    """Sum of the four int8 bytes of each int32 word (dp4a against 1, 1, 1, 1)."""
    return tl.inline_asm_elementwise(asm=_BYTE_SUM, constraints="=r,r", args=[words], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _dot_nibble_words_ptx(words, lut0, lut1, lut2, lut3, x_low, x_high, acc, X_UNSIGNED: tl.constexpr):
    """acc + Σ_{j<8} level(code j of words) · x_j, with x_0..3 the bytes of x_low and x_4..7 those of
    x_high (int8, or uint8 when X_UNSIGNED)."""
    return tl.inline_asm_elementwise(asm=_DOT_UNSIGNED_X if X_UNSIGNED else _DOT_SIGNED_X,
                                     constraints="=r,r,r,r,r,r,r,r,r",
                                     args=[words, lut0, lut1, lut2, lut3, x_low, x_high, acc], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _prmt(a, b, selector):
    """PTX prmt.b32 (default mode, selector nibbles without the sign bit): byte i of the result is byte
    (selector >> 4i) & 7 of the 8-byte value b:a."""
    result = tl.zeros(selector.shape, tl.int32)
    for i in tl.static_range(4):
        index = (selector >> (4 * i)) & 7
        picked = tl.where(index < 4, a >> (8 * (index & 3)), b >> (8 * (index & 3))) & 0xFF
        result |= picked << (8 * i)
    return result


@triton.jit
def _decode_half(select, pick, lut0, lut1, lut2, lut3):
    """Levels of the four codes whose selectors sit in the low 16 bits of `select` and `pick`."""
    return _prmt(_prmt(lut0, lut1, select), _prmt(lut2, lut3, select), pick)


@triton.jit
def _dp4a(a, b, acc, B_UNSIGNED: tl.constexpr):
    """PTX dp4a.s32.{s32,u32}: acc + Σ_i signed byte i of a · byte i of b (unsigned when B_UNSIGNED)."""
    for i in tl.static_range(4):
        a_byte = (a >> (8 * i)) & 0xFF
        b_byte = (b >> (8 * i)) & 0xFF
        if not B_UNSIGNED:
            b_byte = tl.where(b_byte >= 128, b_byte - 256, b_byte)
        acc += tl.where(a_byte >= 128, a_byte - 256, a_byte) * b_byte
    return acc


@triton.jit
def _decode_nibble_words_emulated(words, lut0, lut1, lut2, lut3):
    select = words & 0x77777777
    pick = ((words >> 1) & 0x44444444) | 0x32103210
    return (_decode_half(select, pick, lut0, lut1, lut2, lut3),
            _decode_half((select >> 16) & 0xFFFF, (pick >> 16) & 0xFFFF, lut0, lut1, lut2, lut3))


@triton.jit
def _word_slots_emulated(words):
    return ((words & 0xFF).to(tl.int8), ((words >> 8) & 0xFF).to(tl.int8), ((words >> 16) & 0xFF).to(tl.int8),
            ((words >> 24) & 0xFF).to(tl.int8))


@triton.jit
def _signed_byte_sum_emulated(words):
    return _dp4a(words, 0x01010101, tl.zeros(words.shape, tl.int32), False)


@triton.jit
def _dot_nibble_words_emulated(words, lut0, lut1, lut2, lut3, x_low, x_high, acc, X_UNSIGNED: tl.constexpr):
    low, high = _decode_nibble_words_emulated(words, lut0, lut1, lut2, lut3)
    return _dp4a(high, x_high, _dp4a(low, x_low, acc, X_UNSIGNED), X_UNSIGNED)


if os.environ.get("TRITON_INTERPRET") == "1":
    decode_nibble_words = _decode_nibble_words_emulated
    word_slots = _word_slots_emulated
    signed_byte_sum = _signed_byte_sum_emulated
    dot_nibble_words = _dot_nibble_words_emulated
else:
    decode_nibble_words = _decode_nibble_words_ptx
    word_slots = _word_slots_ptx
    signed_byte_sum = _signed_byte_sum_ptx
    dot_nibble_words = _dot_nibble_words_ptx
