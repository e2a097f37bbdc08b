"""Compile every HSIC kernel for sm_90 (H100) on a machine without a GPU.

    python benchmarks/compile_sm90.py

Catches lowering errors the interpreter cannot see and prints, per kernel variant, the shared
memory, whether wgmma was used, and ptxas's register/spill report (a dev tool for tuning the
block configurations; it needs no CUDA device, only Triton's bundled ptxas).
"""
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vitsim.kernels import centring, hsic_features, hsic_gram, rbf_median  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")


def build(fn, args):
    """Type strings ("*bf16", "i32") for runtime arguments, values for constexprs (UPPER_CASE
    names, and strides specialised to 1); pointers marked 16-byte aligned as at run time."""
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if isinstance(v, str) and not name.isupper():
            sig[name] = v
            if v.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "constexpr"
            const[name] = v
    return ASTSource(fn, sig, const, attrs)


def compile_one(label, fn, args, opts):
    try:
        k = triton.compile(build(fn, args), target=TARGET, options=opts)
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")
        return False
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                       capture_output=True, text=True)
    usage = [line.strip() for line in r.stderr.splitlines() if "registers" in line or "spill" in line]
    print(f"ok   {label}: shared={k.metadata.shared} wgmma={'wgmma' in ptx} {' | '.join(usage)}")
    os.unlink(f.name)
    return True


def _ptrs(names, dtype):
    return {name: dtype for name in names.split()}


def main() -> int:
    f16, f32 = tl.float16, tl.float32
    ok = []
    for dt, dot, prec, bk, split in (("bf16", f16, "tf32", 64, False), ("fp32", f32, "tf32x3", 32, False),
                                     ("fp32", f32, "tf32", 32, False), ("bf16", f16, "tf32", 64, True)):
        tag = f"{dt} {prec} split={split}"
        operand = dict(BLOCK_K=bk, DOT_DTYPE=dot, PRECISION=prec, SPLIT=split)
        launch = dict(num_warps=8, num_stages=3)
        ok.append(compile_one(f"features {tag}", hsic_features._feature_stats_kernel, dict(
            x_ptr="*" + dt, y_ptr="*" + dt, tiles_ptr="*i32", part_ptr="*fp64",
            **_ptrs("mean_x_ptr mean_y_ptr scale_x_ptr scale_y_ptr norms_x_ptr norms_y_ptr", "*fp32"),
            n="i32", d1="i32", d2="i32", stride_xn="i32", stride_xd=1, stride_yn="i32", stride_yd=1,
            BLOCK=128, **operand), launch))
        for rbf in (False, True):
            ok.append(compile_one(f"gram stats rbf={rbf} {tag}", hsic_gram._gram_stats_kernel, dict(
                x_ptr="*" + dt, y_ptr="*" + dt, tiles_ptr="*i32",
                **_ptrs("mean_x_ptr mean_y_ptr scale_x_ptr scale_y_ptr norms_x_ptr norms_y_ptr", "*fp32"),
                **_ptrs("sigma2_ptr sums_ptr rows_k_ptr rows_l_ptr diag_k_ptr diag_l_ptr", "*fp64"),
                n="i32", d1="i32", d2="i32", stride_xn="i32", stride_xd=1, stride_yn="i32", stride_yd=1,
                num_tiles="i32", RBF=rbf, BLOCK=128, **{f"{k}_X": v for k, v in operand.items()},
                **{f"{k}_Y": v for k, v in operand.items()}), launch))
        ok.append(compile_one(f"gram diag {tag}", hsic_gram._gram_diag_kernel, dict(
            x_ptr="*" + dt, **_ptrs("mean_ptr scale_ptr out_ptr", "*fp32"), n="i32", d="i32",
            stride_n="i32", stride_d=1, BLOCK=128, **operand), launch))
        for shift, bits, above in ((20, 11, False), (0, 9, True), (23, 8, False)):
            ok.append(compile_one(f"radix bins={1 << bits} min_above={above} {tag}",
                                  rbf_median._radix_histogram_kernel, dict(
                x_ptr="*" + dt, **_ptrs("mean_ptr scale_ptr norms_ptr low_ptr", "*fp32"),
                **_ptrs("tiles_ptr prefix_ptr hist_ptr", "*i32"), n="i32", d="i32", stride_n="i32",
                stride_d=1, num_tiles="i32", DIGIT_SHIFT=shift, PREFIX_SHIFT=shift + bits,
                NUM_BINS=1 << bits, MIN_ABOVE=above, BLOCK=128, **operand), launch))
    half = dict(BLOCK_K=64, DOT_DTYPE=f16, PRECISION="tf32", SPLIT=False)
    ok.append(compile_one("sq distances bf16", rbf_median._sq_distance_tiles_kernel, dict(
        x_ptr="*bf16", **_ptrs("mean_ptr scale_ptr norms_ptr out_ptr", "*fp32"), tiles_ptr="*i32",
        n="i32", d="i32", stride_n="i32", stride_d=1, BLOCK=128, **half), dict(num_warps=8, num_stages=3)))
    ok.append(compile_one("column stats bf16", centring._column_stats_kernel, dict(
        x_ptr="*bf16", sum_ptr="*fp64", max_ptr="*fp32", min_ptr="*fp32", n="i32", d="i32",
        stride_n="i32", stride_d=1, ROWS=2048, BLOCK_N=32, BLOCK_D=128), dict(num_warps=4)))
    ok.append(compile_one("features column-major bf16, int64 strides", hsic_features._feature_stats_kernel, dict(
        x_ptr="*bf16", y_ptr="*bf16", tiles_ptr="*i32", part_ptr="*fp64",
        **_ptrs("mean_x_ptr mean_y_ptr scale_x_ptr scale_y_ptr norms_x_ptr norms_y_ptr", "*fp32"),
        n="i32", d1="i32", d2="i32", stride_xn=1, stride_xd="i64", stride_yn="i64", stride_yd=1,
        BLOCK=128, **half), dict(num_warps=8, num_stages=3)))
    ok.append(compile_one("gram stats bf16 x / fp32 y, rbf", hsic_gram._gram_stats_kernel, dict(
        x_ptr="*bf16", y_ptr="*fp32", tiles_ptr="*i32",
        **_ptrs("mean_x_ptr mean_y_ptr scale_x_ptr scale_y_ptr norms_x_ptr norms_y_ptr", "*fp32"),
        **_ptrs("sigma2_ptr sums_ptr rows_k_ptr rows_l_ptr diag_k_ptr diag_l_ptr", "*fp64"),
        n="i32", d1="i32", d2="i32", stride_xn="i32", stride_xd=1, stride_yn="i32", stride_yd=1,
        num_tiles="i32", RBF=True, BLOCK=128, **{f"{k}_X": v for k, v in half.items()},
        BLOCK_K_Y=32, DOT_DTYPE_Y=f32, PRECISION_Y="tf32x3", SPLIT_Y=False), dict(num_warps=8, num_stages=3)))
    # the smaller tiles the launchers pick for d ≈ 1,024 (features) and tiny n (Gram)
    for dt, dot, prec, bk in (("bf16", f16, "tf32", 64), ("fp32", f32, "tf32x3", 32)):
        operand = dict(BLOCK_K=bk, DOT_DTYPE=dot, PRECISION=prec, SPLIT=False)
        ok.append(compile_one(f"features BLOCK=64 {dt} {prec}", hsic_features._feature_stats_kernel, dict(
            x_ptr="*" + dt, y_ptr="*" + dt, tiles_ptr="*i32", part_ptr="*fp64",
            **_ptrs("mean_x_ptr mean_y_ptr scale_x_ptr scale_y_ptr norms_x_ptr norms_y_ptr", "*fp32"),
            n="i32", d1="i32", d2="i32", stride_xn="i32", stride_xd=1, stride_yn="i32", stride_yd=1,
            BLOCK=64, **operand), dict(num_warps=4, num_stages=3)))
        ok.append(compile_one(f"gram stats BLOCK=16 {dt} {prec}", hsic_gram._gram_stats_kernel, dict(
            x_ptr="*" + dt, y_ptr="*" + dt, tiles_ptr="*i32",
            **_ptrs("mean_x_ptr mean_y_ptr scale_x_ptr scale_y_ptr norms_x_ptr norms_y_ptr", "*fp32"),
            **_ptrs("sigma2_ptr sums_ptr rows_k_ptr rows_l_ptr diag_k_ptr diag_l_ptr", "*fp64"),
            n="i32", d1="i32", d2="i32", stride_xn="i32", stride_xd=1, stride_yn="i32", stride_yd=1,
            num_tiles=1, RBF=True, BLOCK=16, **{f"{k}_X": v for k, v in operand.items()},
            **{f"{k}_Y": v for k, v in operand.items()}), dict(num_warps=4, num_stages=3)))
        ok.append(compile_one(f"radix BLOCK=32 {dt} {prec}", rbf_median._radix_histogram_kernel, dict(
            x_ptr="*" + dt, **_ptrs("mean_ptr scale_ptr norms_ptr low_ptr", "*fp32"),
            **_ptrs("tiles_ptr prefix_ptr hist_ptr", "*i32"), n="i32", d=1, stride_n="i32",
            stride_d=1, num_tiles="i32", DIGIT_SHIFT=0, PREFIX_SHIFT=7, NUM_BINS=128, MIN_ABOVE=True,
            BLOCK=32, **operand), dict(num_warps=4, num_stages=3)))
    print(f"{sum(ok)}/{len(ok)} variants compiled")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
