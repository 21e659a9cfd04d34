"""Tile bookkeeping shared by the GEMM kernels: program order and operand casts."""

import triton
import triton.language as tl

from ddq_kernels.fine_grid import cast_rounded


@triton.jit
def grouped_tile(program, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Map a program id to a (row tile, column tile), GROUP row tiles at a time so operands stay in L2."""
    row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    col_tiles = tl.cdiv(cols, BLOCK_COLS)
    width = GROUP * col_tiles
    first_row = (program // width) * GROUP
    group_rows = tl.minimum(row_tiles - first_row, GROUP)
    row_tile = first_row + (program % width) % group_rows
    col_tile = (program % width) // group_rows
    return row_tile, col_tile


@triton.jit
def dot_operand(values, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Round values to the operand dtype; the interpreter multiplies in float32 (its bf16 dot is wrong).

    The products of bf16/fp16 operands are exact in float32, so both backends compute the same sums
    up to summation order.
    """
    operand = cast_rounded(values, dtype, INTERPRET)
    if INTERPRET:
        operand = operand.to(tl.float32)
    return operand
