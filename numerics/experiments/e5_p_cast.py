"""E5. The cast of P before P.V, and the row sum it does not match.

The kernel rounds P to the input dtype for the tensor-core P.V dot, while its running sum l adds the
unrounded fp32 p. Part A swaps the dtype of that one cast (fp16, bf16, or none: fp32) with everything
else as in the kernel (and, separately, the natural exp instead of exp2 with the scale folded in).
Part B measures the mismatch sum(rounded P) / l - 1 per row, and shows what it does to the output when
the values have a common offset mu (V ~ N(mu, 1)): the output is then mu * (1 + mismatch) + ..., an
error proportional to |mu| that a row sum of the rounded P would cancel.
"""

from __future__ import annotations

import numpy as np

from numerics import emulator, inputs, kernel, plots, truth
from numerics.formats import FORMATS
from numerics.markdown import e, table
from numerics.metrics import rmse
from numerics.tensors import to_numpy, to_torch

TITLE = "E5. The P cast and the row-sum mismatch"

SHAPE = {"cpu": (1, 2, 1024, 64), "gpu": (1, 4, 4096, 64)}  # (B, H, N, D), non-causal
TILES = (128, 64)
P_CASTS = ("fp16", "bf16", "fp32")
OFFSETS = (0.0, 0.5, 2.0, 8.0)
DISTRIBUTIONS = ("normal", "fa3_outliers")


def run(lab) -> dict:
    b, h, n, d = SHAPE[lab.mode]
    cast_rows, offset_rows, mismatch = [], [], []
    for dist in DISTRIBUTIONS:
        raw = inputs.qkv(inputs.rng(5), b, h, n, n, d, dist=dist)
        for dtype in ("fp16", "bf16"):
            q, k, v = (to_torch(x, dtype, lab.device) for x in raw)
            true_out, _ = truth.forward(q, k, v, causal=False)
            if lab.on_gpu:  # the kernel itself; on CPU the emulator is the kernel bit for bit (E0)
                out = kernel.forward(q, k, v, config=kernel.block_config(*TILES, d))[0]
                cast_rows.append(
                    {"dist": dist, "dtype": dtype, "p_cast": "kernel", "rmse": rmse(out, true_out)}
                )
                continue
            arrays = [to_numpy(x) for x in (q, k, v)]
            # The P cast swapped, and (its own column) the natural exp with a separate scale instead of exp2.
            for label, changes in [*((c, {"p_cast": c}) for c in P_CASTS), ("exp", {"exp": "exp"})]:
                arith = emulator.KERNEL.with_(block_m=TILES[0], block_n=TILES[1], **changes)
                out = emulator.forward(*arrays, dtype, arith).out
                cast_rows.append({"dist": dist, "dtype": dtype, "p_cast": label, "rmse": rmse(out, true_out)})
            if dist == "normal":
                mismatch.append({"dtype": dtype, **_mismatch(arrays[0], arrays[1], dtype)})
                offset_rows += _offsets(lab, raw, dtype)
    return {"shape": [b, h, n, d], "casts": cast_rows, "offsets": offset_rows, "mismatch": mismatch}


def _mismatch(q, k, dtype) -> dict:
    """Per row, sum(round(p)) / sum(p) - 1 with p = exp2(s - max s) in fp32 over the whole row, as the
    kernel's blocks add up to when the max is the row max."""
    s = np.matmul(q.astype(np.float32), np.swapaxes(k.astype(np.float32), -1, -2)) * np.float32(
        emulator.LOG2E / np.sqrt(q.shape[-1])
    )
    p = np.exp2(s - s.max(axis=-1, keepdims=True))
    rounded = FORMATS[dtype].round(p)
    ratio = rounded.sum(axis=-1, dtype=np.float64) / p.sum(axis=-1, dtype=np.float64) - 1
    return {"mean": float(ratio.mean()), "std": float(ratio.std()), "max_abs": float(np.abs(ratio).max())}


def _offsets(lab, raw, dtype) -> list[dict]:
    """Output error against the common offset mu of the values: the kernel's row sum vs that of the
    rounded P, before and after the output's own rounding."""
    q_raw, k_raw, v_raw = raw
    rows = []
    for mu in OFFSETS:
        q, k, v = (to_torch(x, dtype, lab.device) for x in (q_raw, k_raw, v_raw + mu))
        true_out, _ = truth.forward(q, k, v, causal=False)
        arrays = [to_numpy(x) for x in (q, k, v)]
        for row_sum, label in (("p", "kernel: l sums unrounded p"), ("p_cast", "l sums the rounded P")):
            for out_format, stage in ((dtype, "output"), ("fp32", "before the output rounding")):
                arith = emulator.KERNEL.with_(
                    block_m=TILES[0], block_n=TILES[1], row_sum=row_sum, out=out_format
                )
                out = emulator.forward(*arrays, dtype, arith).out
                rows.append(
                    {"dtype": dtype, "mu": mu, "series": f"{label}, {stage}", "rmse": rmse(out, true_out)}
                )
        floor = emulator.forward(
            *arrays, dtype, emulator.KERNEL.with_(block_m=TILES[0], block_n=TILES[1], p_cast="fp32")
        )
        rows.append(
            {
                "dtype": dtype,
                "mu": mu,
                "series": "P not rounded (floor), output",
                "rmse": rmse(floor.out, true_out),
            }
        )
    return rows


def section(cpu, gpu, figure):
    fig, axes = plots.new(ncols=2, width=4.8, height=3.5)
    if cpu is not None:
        colors = {
            "kernel: l sums unrounded p": plots.COLORS["kernel"],
            "l sums the rounded P": plots.COLORS["remedy"],
            "P not rounded (floor)": plots.COLORS["floor"],
        }
        for ax, dtype in zip(axes, ("fp16", "bf16")):
            for series in dict.fromkeys(r["series"] for r in cpu["offsets"]):
                chosen = [r for r in cpu["offsets"] if r["dtype"] == dtype and r["series"] == series]
                color = colors[series.split(", ")[0]]
                style = "o:" if series.endswith("before the output rounding") else "o-"
                ax.plot(
                    [r["mu"] for r in chosen],
                    [r["rmse"] for r in chosen],
                    style,
                    ms=3,
                    color=color,
                    label=series,
                )
            ax.set_xscale("symlog", linthresh=0.5)
            ax.set_yscale("log")
            ax.set_xlabel("offset mu of the values, V ~ N(mu, 1)")
            ax.set_ylabel("RMSE of the output")
            ax.set_title(f"{dtype}: row sum of unrounded vs rounded P")
            ax.legend(fontsize=6.5)
    plots.save(fig, figure)

    parts, findings = [], []
    for name, record in (("CPU", cpu), ("GPU", gpu)):
        if record is None:
            continue
        b, h, n, d = record["shape"]
        body = []
        for dist in DISTRIBUTIONS:
            for dtype in ("fp16", "bf16"):
                got = {
                    r["p_cast"]: r["rmse"]
                    for r in record["casts"]
                    if r["dist"] == dist and r["dtype"] == dtype
                }
                body.append([dist, dtype, e(got.get("kernel")), *(e(got.get(c)) for c in (*P_CASTS, "exp"))])
        parts.append(
            f"**{name}**, B={b} H={h} N={n} D={d} non-causal, output RMSE with P cast to:\n\n"
            + table(
                [
                    "inputs",
                    "dtype",
                    "kernel as run",
                    "P in fp16 (emulated)",
                    "P in bf16 (emulated)",
                    "P not cast (emulated)",
                    "exp, not exp2 (emulated)",
                ],
                body,
            )
        )
    if cpu is not None:
        for dtype in ("fp16", "bf16"):
            got = {
                r["p_cast"]: r["rmse"]
                for r in cpu["casts"]
                if r["dist"] == "fa3_outliers" and r["dtype"] == dtype
            }
            added = np.sqrt(max(got[dtype] ** 2 - got["fp32"] ** 2, 0))
            findings.append(
                f"{dtype}, FA3 inputs: with P cast to fp16 the RMSE is {e(got['fp16'])}, to bf16 "
                f"{e(got['bf16'])}, without the cast {e(got['fp32'])} (the floor: the final rounding of the "
                f"output). The kernel's own cast adds {e(added)} in quadrature, {added / got['fp32']:.2f}x "
                "the floor: the P cast is the only sizeable error source of the kernel besides the "
                "unavoidable output rounding, and the smaller of the two."
            )
            findings.append(
                f"{dtype}: computing p with the natural exp and a separate scale instead of exp2 with the "
                f"scale folded in gives RMSE {e(got['exp'], 2)} vs {e(got[dtype], 2)}: the base-2 fold costs "
                "no accuracy."
            )
        mm = {r["dtype"]: r for r in cpu["mismatch"]}
        parts.append(
            "Row-sum mismatch sum(round(P)) / l - 1 over all rows (N(0,1) inputs):\n\n"
            + table(
                ["dtype", "mean", "std", "largest"],
                [[dt, e(m["mean"]), e(m["std"]), e(m["max_abs"])] for dt, m in mm.items()],
            )
        )
        for dtype in ("fp16", "bf16"):
            pts = {(r["series"], r["mu"]): r["rmse"] for r in cpu["offsets"] if r["dtype"] == dtype}
            top = OFFSETS[-1]
            before = [
                pts[(f"{s}, before the output rounding", top)]
                for s in ("kernel: l sums unrounded p", "l sums the rounded P")
            ]
            after = [
                pts[(f"{s}, output", top)] for s in ("kernel: l sums unrounded p", "l sums the rounded P")
            ]
            findings.append(
                f"{dtype}: l (a sum of unrounded p) and the rounded P that multiplies V disagree by "
                f"{e(mm[dtype]['std'])} per row (std; mean {e(mm[dtype]['mean'])}, unbiased). With values "
                f"offset by mu = {top:g} that is visible before the final rounding ({e(before[0])} vs "
                f"{e(before[1])} with a row sum of the rounded P) but not after it ({e(after[0])} vs "
                f"{e(after[1])}): the output's own rounding, u |mu|, is larger."
            )
    markdown = (
        __doc__.split("\n", 2)[2].strip()
        + "\n\n"
        + "\n\n".join(parts)
        + f"\n\n![P cast](img/numerics/{figure.name})"
    )
    return markdown, findings
