"""GPU checks of spec §5: the Triton kernel on the GPU against the NumPy golden, and a large randomized
cross-check (millions of outputs) against arm_ref's scalar C compiled for the GPU with CuPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddq.deploy import int_gemm
from ddq.deploy.packing import pack
from int_gemm_cases import gpu_uncompilable_tiles, packed_arguments

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from ddq_kernels.int_gemm import (  # noqa: E402 (needs the skip first)
    DECODE_BYTES, DECODE_GATHER, DECODE_NIBBLE_MMA, DECODE_NIBBLE_PTX, TileConfig, int_gemm_packed)


def random_case(rng, m, n, k, bits_x, bits_w, signed_x):
    codes_x = rng.integers(0, 1 << bits_x, (m, k), dtype=np.uint8)
    codes_w = rng.integers(0, 1 << bits_w, (n, k), dtype=np.uint8)
    lut_x = (rng.integers(-128, 128, 1 << bits_x).astype(np.int8) if signed_x
             else rng.integers(0, 256, 1 << bits_x).astype(np.uint8))
    lut_w = rng.integers(-128, 128, (n, 1 << bits_w)).astype(np.int8)
    shift = int(rng.integers(12, 20))
    mult = rng.integers(0, 1 << 6, n).astype(np.int32)
    offset = rng.integers(-(1 << 26), 1 << 26, n).astype(np.int64)
    i_min = np.where(rng.random(n) < 0.3, rng.integers(0, 256, n), 0).astype(np.int32)
    return [codes_x, lut_x, codes_w, lut_w, mult, offset, shift, i_min, int(rng.integers(1, 9))]


def test_triton_gpu_matches_the_golden():
    rng = np.random.default_rng(0)
    for bits_w in range(1, 9):
        for m in (1, 16, 300):
            case = random_case(rng, m, int(rng.integers(1, 200)), int(rng.integers(1, 2000)), 1 + bits_w % 8, bits_w,
                               bits_w % 2 == 0)
            want = int_gemm(*case)
            got = int_gemm(*case, backend="triton")
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


GPU_PATHS = {
    "gemv split-K": (1, TileConfig(1, 64, 256, split_k=8)),
    "dot split-K": (16, TileConfig(16, 64, 256, split_k=8)),
    "dot split-K register LUT, M=40": (40, TileConfig(64, 64, 128, split_k=4, decode=DECODE_GATHER)),
    "decode once": (300, TileConfig(128, 256, 128, num_warps=8, decode_once=True)),
    "decode once TMA": (300, TileConfig(128, 128, 128, num_warps=8, num_stages=4, decode_once=True, tma=True)),
    "decode once TMA by byte": (300, TileConfig(128, 128, 128, num_warps=8, num_stages=4, decode_once=True, tma=True,
                                                decode=DECODE_BYTES)),
}


def check_path(path, m, config, weight_bits, shapes):
    rng = np.random.default_rng(len(path))
    for (bits_w, signed_x), (n, k) in zip(weight_bits, shapes):
        case = random_case(rng, m, n, k, 4, bits_w, signed_x)
        want = int_gemm(*case)
        acc, codes = int_gemm_packed(*packed_arguments(case, bits_w, "cuda"), bits_w, k, config=config)
        np.testing.assert_array_equal(acc.cpu().numpy(), want[0], err_msg=f"{path} bits_w={bits_w} k={k}")
        np.testing.assert_array_equal(codes.cpu().numpy(), want[1], err_msg=f"{path} bits_w={bits_w} k={k}")


@pytest.mark.parametrize("path", list(GPU_PATHS))
def test_triton_gpu_paths_at_realistic_sizes(path):
    """Each path forced by its config on GPU-sized odd shapes (several K splits, many tiles) vs the golden."""
    m, config = GPU_PATHS[path]
    shape = (1500, 8191) if m < 100 else (257, 1025)
    check_path(path, m, config, ((3, False), (8, True)), (shape, shape))


NIBBLE_PATHS = {
    "nibble gemv split-K": (1, TileConfig(1, 32, 256, split_k=8, decode=DECODE_NIBBLE_PTX)),
    "nibble gemv one split": (1, TileConfig(1, 64, 128, decode=DECODE_NIBBLE_PTX)),
    "nibble dot split-K, M=16": (16, TileConfig(16, 64, 128, split_k=8, decode=DECODE_NIBBLE_PTX)),
    "nibble dot, M=45": (45, TileConfig(64, 64, 128, split_k=3, decode=DECODE_NIBBLE_PTX)),
    "nibble dot weights as A, M=16": (16, TileConfig(16, 64, 128, split_k=8, decode=DECODE_NIBBLE_PTX,
                                                      weights_as_a=True)),
    "nibble dot weights as A, M=45": (45, TileConfig(64, 64, 128, split_k=3, decode=DECODE_NIBBLE_PTX,
                                                      weights_as_a=True)),
    "nibble mma fragments, M=16": (16, TileConfig(16, 256, 64, num_warps=8, num_stages=3, split_k=4,
                                                  decode=DECODE_NIBBLE_MMA)),
    "nibble mma fragments, warps on K, M=13": (13, TileConfig(16, 32, 64, num_warps=8, num_stages=3, split_k=5,
                                                              decode=DECODE_NIBBLE_MMA)),
    "nibble mma fragments, M=2": (2, TileConfig(16, 64, 64, num_warps=4, num_stages=6, row_tiles=1,
                                                decode=DECODE_NIBBLE_MMA)),
    "nibble mma fragments, warps on rows and K, M=8": (8, TileConfig(16, 64, 64, num_warps=4, num_stages=2, split_k=3,
                                                                     decode=DECODE_NIBBLE_MMA)),
    "nibble decode once TMA": (300, TileConfig(128, 128, 128, num_warps=8, num_stages=4, decode_once=True, tma=True,
                                               decode=DECODE_NIBBLE_PTX)),
}


@pytest.mark.parametrize("path", list(NIBBLE_PATHS))
def test_triton_gpu_nibble_ptx_paths(path):
    """The prmt/dp4a paths (4-bit containers, rows of whole int32 words): 3- and 4-bit weights, both table
    types, K with padding codes inside the last word (K mod 8 = 7) and K an exact number of words."""
    m, config = NIBBLE_PATHS[path]
    # (1024, 4096): tiles cover the weights exactly (unmasked loads) for the configs above.
    shapes = ((1501, 8183), (1024, 4096)) if m < 100 else ((257, 1023), (131, 2048))
    check_path(path, m, config, ((3, False), (4, True)), shapes)
    check_path(path, m, config, ((4, False), (3, True)), shapes)


@pytest.mark.parametrize("path", list(gpu_uncompilable_tiles()))
def test_tiles_triton_cannot_compile_for_the_gpu_get_a_clear_error(path):
    """Tiles that the interpreter tests force (test_int_gemm_backends.py) but Triton 3.6 does not compile for the
    GPU (run 26: a pass-manager failure of the register-LUT gather in narrow tiles of 1-bit containers; int8 dots
    need K ≥ 32) are a ValueError naming the config, not the compiler's internals."""
    config = gpu_uncompilable_tiles()[path]
    m = 1 if config.block_m == 1 else 5
    bits_w = 4 if config.decode == DECODE_NIBBLE_PTX else 1
    case = random_case(np.random.default_rng(3), m, 5, 64, 4, bits_w, True)
    with pytest.raises(ValueError, match="Triton cannot compile the kernel of TileConfig"):
        int_gemm_packed(*packed_arguments(case, bits_w, "cuda"), bits_w, 64, config=config)


def test_triton_gpu_maximum_magnitude_at_the_k_limit():
    k = 65536
    case = [np.zeros((3, k), np.uint8), np.array([255, 0], np.uint8), np.full((5, k), 15, np.uint8),
            np.full((5, 16), -128, np.int8), np.full(5, (1 << 30) - 1, np.int32),
            np.array([(1 << 61) - 1, -(1 << 61) + 1, 0, 5, -5], np.int64), 61, np.array([0, 9, 255, 0, 0], np.int32), 8]
    want = int_gemm(*case)
    got = int_gemm(*case, backend="triton")
    assert want[0][0, 0] == -128 * 255 * k
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_cupy_matches_the_golden():
    pytest.importorskip("cupy")
    rng = np.random.default_rng(1)
    for bits_w in range(1, 9):
        case = random_case(rng, 37, 41, int(rng.integers(1, 900)), 8 - bits_w % 8, bits_w, bits_w % 2 == 1)
        want = int_gemm(*case)
        got = int_gemm(*case, backend="cupy")
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_triton_and_cupy_agree_on_millions_of_random_outputs():
    """Two independent GPU implementations (Triton, and the C reference compiled by NVRTC) on ≥ 4M outputs."""
    pytest.importorskip("cupy")
    from ddq.deploy.cupy_backend import int_gemm_cupy_packed

    generator = torch.Generator(device="cuda").manual_seed(0)
    rng = np.random.default_rng(2)
    outputs = 0

    def randint(low, high, shape, dtype):
        return torch.randint(low, high, shape, generator=generator, device="cuda", dtype=torch.int64).to(dtype)

    for bits_w in range(1, 9):
        for signed_x in (False, True):
            bits_x = int(rng.integers(1, 9))
            m, n, k = 512, 512, int(rng.integers(1, 1200))
            codes_x = randint(0, 1 << bits_x, (m, k), torch.uint8)
            codes_w = randint(0, 1 << bits_w, (n, k), torch.uint8)
            lut_x = randint(-128, 128, (1 << bits_x,), torch.int8) if signed_x else randint(0, 256, (1 << bits_x,),
                                                                                              torch.uint8)
            lut_w = randint(-128, 128, (n, 1 << bits_w), torch.int8)
            shift = int(rng.integers(8, 24))
            mult = randint(0, 1 << 8, (n,), torch.int32)
            offset = randint(-(1 << 30), 1 << 30, (n,), torch.int64)
            i_min = randint(0, 64, (n,), torch.int32)
            bits_out = int(rng.integers(1, 9))
            packed = torch.from_numpy(pack(codes_w.cpu().numpy(), bits_w)).cuda()
            acc_t, codes_t = int_gemm_packed(codes_x, lut_x, packed, lut_w, mult, offset, shift, i_min, bits_out,
                                             bits_w, k)
            acc_c, codes_c = int_gemm_cupy_packed(codes_x, lut_x, signed_x, packed, lut_w, mult, offset, shift,
                                                  i_min, bits_out, bits_w, k)
            assert torch.equal(acc_t, torch.as_tensor(acc_c, device="cuda")), (bits_w, signed_x, k)
            assert torch.equal(codes_t, torch.as_tensor(codes_c, device="cuda")), (bits_w, signed_x, k)
            outputs += m * n
    assert outputs >= 4_000_000


def test_the_exported_model_gives_identical_codes_on_gpu_backends(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("safetensors")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from deploy_fixtures import trained_ddq_cnn

    from ddq.deploy import export, load

    model, images, _ = trained_ddq_cnn()
    export(model.cpu(), tmp_path / "cnn.safetensors")
    integer = load(tmp_path / "cnn.safetensors")
    golden = integer.run(images[:200], backend="c")
    backends = ["triton"]
    try:
        import cupy  # noqa: F401

        backends.append("cupy")
    except ImportError:
        pass
    for backend in backends:
        run = integer.run(images[:200], backend=backend)
        for got, want in zip(run.codes, golden.codes):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(run.logits, golden.logits)
