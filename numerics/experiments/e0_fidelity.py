"""E0. Does the numpy emulator reproduce the real kernel bit for bit?

Every later experiment leans on the emulator to change one quantity's precision at a time, so first the
emulator at the kernel's own precisions is compared element by element with the kernel: under the Triton
interpreter (CPU) and compiled (GPU), forward (out, the saved LSE in the kernel's base and, for fp32,
its low part) and backward (dq, dk, dv).
"""

from __future__ import annotations

import numpy as np

from numerics import emulator, inputs, kernel, plots
from numerics.formats import FORMATS
from numerics.markdown import pct, table
from numerics.metrics import ulp_distance
from numerics.tensors import TORCH_DTYPES, to_numpy, to_torch

TITLE = "E0. Emulator fidelity"

# (dtype, causal, B, H, Nq, Nk, D, BLOCK_M, BLOCK_N): odd lengths, both causal cases, a padded head dim.
FORWARD_CPU = [
    ("fp16", False, 1, 2, 256, 256, 64, 64, 64),
    ("fp16", True, 1, 2, 200, 333, 80, 32, 32),
    ("bf16", False, 1, 2, 256, 256, 64, 64, 64),
    ("bf16", True, 1, 1, 130, 190, 128, 32, 64),
    ("fp32", True, 1, 1, 100, 150, 40, 32, 32),
]
FORWARD_GPU = [
    ("fp16", False, 1, 4, 2048, 2048, 128, 128, 64),
    ("fp16", True, 1, 2, 1000, 1500, 80, 128, 64),
    ("bf16", False, 1, 4, 2048, 2048, 128, 128, 64),
    ("bf16", True, 1, 2, 1000, 1500, 64, 128, 64),
    ("fp32", False, 1, 2, 1024, 1024, 64, 64, 32),
]
# Backward cases run with the kernel's default tiles (16 x 16 under the interpreter).
BACKWARD_CPU = [
    ("fp16", True, 1, 1, 96, 112, 64),
    ("bf16", False, 1, 1, 64, 80, 64),
    ("fp32", True, 1, 1, 48, 40, 32),
]
BACKWARD_GPU = [("fp16", True, 1, 2, 1024, 1024, 128), ("bf16", False, 1, 2, 1024, 1024, 64)]


def _compare(quantity, got, emulated, fmt) -> dict:
    """Share of bit-identical elements, and the largest difference in ulps of the largest value (an
    elementwise ulp count would explode for tiny values that differ in sign)."""
    got, emulated = np.asarray(got, dtype=np.float64), np.asarray(emulated, dtype=np.float64)
    finite = np.isfinite(got) & np.isfinite(emulated)
    identical = np.sum(ulp_distance(got[finite], emulated[finite], fmt) == 0) + np.sum(
        ~finite & (got == emulated)
    )
    scale = np.abs(got[finite]).max() * FORMATS[fmt].unit_roundoff * 2
    largest_diff = np.abs(got - emulated)[finite].max()
    return {
        "quantity": quantity,
        "identical": float(identical / got.size),
        # All zeros on both sides (fp16/bf16 drop a negligible LSE low part) agree exactly.
        "max_diff_ulps": (
            float(largest_diff / scale) if scale > 0 else (float("inf") if largest_diff > 0 else 0.0)
        ),
    }


def _backward_blocks(lab, dtype, head_dim):
    """The tiles of the kernel's dK/dV pass (the emulator uses one tile shape for both passes)."""
    from core.testing import portable

    block_d = portable.config.padded_head_dim(head_dim)
    dkdv, _ = portable.config.backward_configs(block_d, TORCH_DTYPES[dtype], not lab.on_gpu)
    return dkdv.block_m, dkdv.block_n


def run(lab) -> dict:
    rows = []
    for i, (dtype, causal, b, h, nq, nk, d, bm, bn) in enumerate(lab.pick(FORWARD_CPU, FORWARD_GPU)):
        q, k, v = (to_torch(x, dtype, lab.device) for x in inputs.qkv(inputs.rng(i), b, h, nq, nk, d))
        out, lse, lse_low = kernel.forward(q, k, v, causal=causal, config=kernel.block_config(bm, bn, d))
        case = {
            "pass": "forward",
            "dtype": dtype,
            "causal": causal,
            "shape": [b, h, nq, nk, d],
            "blocks": [bm, bn],
        }
        arith = kernel.arithmetic(dtype, bm, bn)
        emu = emulator.forward(*(to_numpy(x) for x in (q, k, v)), dtype, arith, causal=causal)
        compared = [("out", to_numpy(out), emu.out, dtype), ("lse", to_numpy(lse), emu.saved_lse, "fp32")]
        compared.append(("lse_low", to_numpy(lse_low), emu.lse_low, "fp32"))  # the two-part LSE
        for quantity, got, emulated, fmt in compared:
            rows.append({**case, **_compare(quantity, got, emulated, fmt)})

    for i, (dtype, causal, b, h, nq, nk, d) in enumerate(lab.pick(BACKWARD_CPU, BACKWARD_GPU)):
        gen = inputs.rng(100 + i)
        q, k, v = (to_torch(x, dtype, lab.device) for x in inputs.qkv(gen, b, h, nq, nk, d))
        dout = to_torch(inputs.normal(gen, (b, h, nq, d)), dtype, lab.device)
        got = kernel.forward_backward(q, k, v, dout, causal=causal)
        bm, bn = _backward_blocks(lab, dtype, d)
        numpy_args = [to_numpy(x) for x in (q, k, v, got["out"], dout)]
        lse_low = None if got["lse_low"] is None else to_numpy(got["lse_low"])
        arith = kernel.arithmetic(dtype, bm, bn)
        emu = emulator.backward(
            *numpy_args, to_numpy(got["lse"]), dtype, arith, lse_low=lse_low, causal=causal
        )
        case = {
            "pass": "backward",
            "dtype": dtype,
            "causal": causal,
            "shape": [b, h, nq, nk, d],
            "blocks": [bm, bn],
        }
        for quantity in ("dq", "dk", "dv"):
            compared = _compare(quantity, to_numpy(got[quantity]), getattr(emu, quantity), dtype)
            rows.append({**case, **compared})
    return {"rows": rows}


def _label(row) -> str:
    _, _, nq, nk, d = row["shape"]
    return f"{row['dtype']} {'causal' if row['causal'] else 'full'} {nq}x{nk} D{d}"


def section(cpu, gpu, figure):
    fig, axes = plots.new(ncols=2, width=5.2)
    for ax, record, title in ((axes[0], cpu, "CPU (Triton interpreter)"), (axes[1], gpu, "GPU (compiled)")):
        ax.set_title(title)
        if record is None:
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
            continue
        rows = _rows(record)
        ax.barh(range(len(rows)), [r["identical"] for r in rows], color=plots.COLORS["emulator"])
        ax.set_yticks(range(len(rows)), [f"{_label(r)} {r['quantity']}" for r in rows], fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of elements bit-identical to the emulator")
    plots.save(fig, figure)

    headers = ["pass", "case", "tiles", "quantity", "bit-identical", "max difference"]
    parts, findings = [], []
    for name, record in (("CPU", cpu), ("GPU", gpu)):
        if record is None:
            continue
        rows = _rows(record)
        body = [
            [r["pass"], _label(r), "x".join(map(str, r["blocks"])), r["quantity"], pct(r["identical"]),
             f"{r['max_diff_ulps']:.2f} ulp"]
            for r in rows
        ]  # fmt: skip
        parts.append(f"**{name}** ({record['meta']['device']}):\n\n" + table(headers, body))
        worst = min(rows, key=lambda r: r["identical"])
        if name == "GPU":  # the GPU agreement is the headline
            findings.insert(
                0,
                f"Against the compiled kernel on the {record['meta']['device']} the emulator agrees to "
                f"within {max(r['max_diff_ulps'] for r in rows):.2f} ulp of the largest value "
                f"({pct(worst['identical'])} to {pct(max(r['identical'] for r in rows))} of the elements "
                "bit-identical): tensor-core summation order, ex2.approx and fused multiply-adds differ "
                "from numpy's by a rounding or two."
                + (
                    ""
                    if "core_kernels" in record["meta"]
                    else " (This GPU run compared the kernel, which compensates its row sum l, with an "
                    "emulator of the time that summed l plainly; the CPU run shows the current pair agree.)"
                ),
            )
        elif worst["identical"] == 1.0:
            findings.append(
                "The emulator reproduces the kernel under the Triton interpreter **bit for bit**: out, the "
                "saved LSE, dq, dk and dv; fp16, bf16 and fp32; causal or not, ragged lengths, padded head "
                "dims."
            )
        else:
            findings.append(
                f"Under the interpreter the emulator matches {pct(worst['identical'])} of "
                f"{worst['quantity']} in the worst case ({_label(worst)}), within "
                f"{worst['max_diff_ulps']:.2f} ulp of the largest value."
            )
        if name == "CPU":
            findings.append(
                "This comparison is how the lab found that Triton 3.9's interpreter *truncates* fp32 -> "
                "bf16 casts where the GPU rounds to nearest (about doubling the error of bf16 outputs). Core "
                "now patches the interpreter before it launches a kernel there "
                "(`core._runtime.patch_interpreter`): its fp32 -> bf16 casts round to nearest even "
                "and its bf16 dots multiply the values rather than their bit patterns (upstream "
                "triton-lang/triton#11584). Interpreted bf16 kernels therefore round as compiled ones do, "
                "and the emulator matches them with the GPU's rounding. The same patch makes every "
                "interpreted dot sum its exact products in float64 and round once, so that no dot depends "
                "on the tile shape or on which operand is which."
            )
    markdown = (
        "Every later experiment changes the precision of one quantity in the emulator, so the emulator must "
        "first reproduce the kernel at the kernel's own precisions. It runs the same float32 operations in "
        "the same order as the kernel over the same tiles, computes every dot as the patched interpreter "
        "does (exact products summed in float64, rounded once), Kahan-compensates the running row sum l "
        "for every dtype and, for fp32 inputs, works in natural base, Kahan-sums the per-block dots and "
        "carries the scaled scores (the scale's rounding error, by an FMA), the running max and the saved "
        "LSE in two parts, as the kernel does.\n\n"
        + "\n\n".join(parts)
        + "\n\n'max difference' is the largest |kernel - emulator| in ulps of the largest value of that "
        "quantity." + f"\n\n![fidelity](img/numerics/{figure.name})"
    )
    return markdown, findings


def _rows(record) -> list[dict]:
    """The comparisons with the emulator as the kernel ran (records before the interpreter's bf16 fix also
    hold comparisons with an emulator rounding differently)."""
    return [r for r in record["rows"] if r.get("rounding", "as run") == "as run"]
