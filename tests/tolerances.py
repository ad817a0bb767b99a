"""The one dtype -> tolerance table for comparing kernels with the reference.

Low-precision outputs are also judged against the reference's *own* low-precision error
(:func:`assert_matches_reference`): a bf16 kernel must be about as close to the fp64 truth as
the bf16 reference is, not merely within a loose absolute bound.
"""

import torch

# (atol, rtol) for values of order 1 (normalised activations and their gradients).
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def tol(dtype):
    atol, rtol = TOL[dtype]
    return dict(atol=atol, rtol=rtol)


def assert_matches_reference(out, ref_same_dtype, ref_fp64, name="output", slack=2.0):
    """``out`` within the dtype's table of ``ref_same_dtype``, and its max error against the
    fp64 truth at most ``slack`` x the reference's own error (plus the table's atol)."""
    torch.testing.assert_close(out, ref_same_dtype, **tol(out.dtype), msg=lambda m: f"{name}: {m}")
    err = (out.double() - ref_fp64.double()).abs().max().item()
    ref_err = (ref_same_dtype.double() - ref_fp64.double()).abs().max().item()
    atol = TOL[out.dtype][0]
    assert err <= slack * ref_err + atol, (
        f"{name}: max error {err:.3g} vs fp64 exceeds {slack} x the reference's own {out.dtype} "
        f"error {ref_err:.3g} + {atol:g}"
    )
