"""E6. Biased rounding when logits tie the row max (Qiu and Yao, arXiv 2510.04212).

Qiu and Yao trace bf16 training failures of flash attention to rounding errors that do not average out:
when several logits of a row sit at (or just below) the row max, their exp(s - m) are 1 or just below 1,
and the bf16 rounding of those values goes the same way for all of them. Their fix moves the max off
the ties (m' = 2m for a positive max, 0 for a negative one, when two logits are within 1e-3 of it) so
that no exponential is near 1.

Setup: the keys of a row are near-copies of one key, k_j = k0 + sigma xi_j, so the logits of a row spread
by about sigma below the max; values are low-rank-like, V ~ N(1, 0.5^2) (all of one sign). The bias is
the mean signed error of the output relative to the mean |output|, averaged over seeds, with its standard
error across seeds (the rows of one draw err alike, so only the seeds are independent); bias / RMSE is
the systematic share of the error (0: pure noise, +-1: all of it). sigma = 0 makes exact ties (every p is
exactly 1, nothing to round); a large sigma spreads the logits and the rounding becomes symmetric.
"""

from __future__ import annotations

import numpy as np

from numerics import emulator, inputs, kernel, plots, truth
from numerics.formats import FORMATS
from numerics.markdown import e, table
from numerics.tensors import to_numpy, to_torch

TITLE = "E6. Biased rounding at tied maxima"

N_QUERIES, N_KEYS, HEAD_DIM = 256, 512, 64
SIGMAS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)
SEEDS = tuple(range(6))
TILES = (64, 64)
# Their setting: every quantity in the input dtype, l a plain sum (the kernel Kahan-compensates it).
ALL_LOW = {**{q: "input" for q in ("scores", "m", "l", "alpha", "p", "acc")}, "l_kahan": False}
VARIANTS = {
    "kernel arithmetic": {},
    "kernel + Qiu-Yao max shift": {"tie_shift": True},
    "kernel + row sum of rounded P": {"row_sum": "p_cast"},
    "everything in the input dtype": ALL_LOW,
    "everything in the input dtype + max shift": {**ALL_LOW, "tie_shift": True},
}


def near_copies(gen, sigma):
    q, k, v = inputs.qkv(gen, 1, 1, N_QUERIES, N_KEYS, HEAD_DIM)
    k = k[:, :, :1] + sigma * k
    return q, k, 1.0 + 0.5 * v


def run(lab) -> dict:
    rows = []
    for dtype in ("fp16", "bf16"):
        for sigma in SIGMAS:
            per_seed, near_one = {}, []
            for seed in SEEDS:
                q, k, v = (to_torch(x, dtype, lab.device) for x in near_copies(inputs.rng(600 + seed), sigma))
                true_out = truth.forward(q, k, v, causal=False)[0].cpu().numpy()
                runs = {}
                # On CPU the emulator's "kernel arithmetic" is the interpreted kernel bit for bit (E0).
                if lab.on_gpu:
                    runs["kernel"] = to_numpy(
                        kernel.forward(q, k, v, config=kernel.block_config(*TILES, HEAD_DIM))[0]
                    )
                else:
                    arrays = [to_numpy(x) for x in (q, k, v)]
                    for name, changes in VARIANTS.items():
                        arith = emulator.KERNEL.with_(block_m=TILES[0], block_n=TILES[1], **changes)
                        runs[name] = emulator.forward(*arrays, dtype, arith).out
                    near_one.append(_share_rounded_to_one(arrays[0], arrays[1], dtype))
                scale = np.abs(true_out).mean()
                for name, out in runs.items():
                    err = np.asarray(out, dtype=np.float64) - true_out
                    per_seed.setdefault(name, []).append(
                        (err.mean() / scale, np.sqrt(np.mean(err**2)) / scale)
                    )
            for name, values in per_seed.items():
                bias, rmse = np.array(values).T
                rows.append(
                    {
                        "dtype": dtype,
                        "sigma": sigma,
                        "series": name,
                        "bias": float(bias.mean()),
                        "stderr": float(bias.std(ddof=1) / np.sqrt(len(bias))),
                        "rmse": float(rmse.mean()),
                        "p_near_one": float(np.mean(near_one)) if near_one else None,
                    }
                )
    return {"shape": [N_QUERIES, N_KEYS, HEAD_DIM], "rows": rows}


def _share_rounded_to_one(q, k, dtype) -> float:
    """Share of the p = exp2(s - max) that are below 1 but round to exactly 1 in the input dtype."""
    s = np.matmul(q.astype(np.float32), np.swapaxes(k.astype(np.float32), -1, -2))
    s = s * np.float32(emulator.LOG2E / np.sqrt(HEAD_DIM))
    p = np.exp2(s - s.max(axis=-1, keepdims=True))
    return float(np.mean((p < 1) & (FORMATS[dtype].round(p) == 1)))


COLORS = {
    "kernel": plots.COLORS["kernel"],
    "kernel arithmetic": plots.COLORS["emulator"],
    "kernel + Qiu-Yao max shift": plots.COLORS["remedy"],
    "kernel + row sum of rounded P": plots.COLORS["floor"],
    "everything in the input dtype": plots.COLORS["low precision"],
    "everything in the input dtype + max shift": plots.COLORS["standard"],
}


def _share(row) -> float:
    return row["bias"] / row["rmse"]


def section(cpu, gpu, figure):
    fig, axes = plots.new(ncols=2, width=5.0, height=3.7)
    for ax, dtype in zip(axes, ("fp16", "bf16"), strict=True):
        for mode, record in (("cpu", cpu), ("gpu", gpu)):
            if record is None:
                continue
            for series in dict.fromkeys(r["series"] for r in record["rows"]):
                chosen = [r for r in record["rows"] if r["dtype"] == dtype and r["series"] == series]
                if not chosen:
                    continue
                run_name = "interpreter" if mode == "cpu" else "GPU"
                ax.plot(
                    [max(r["sigma"], 3e-5) for r in chosen],
                    [_share(r) for r in chosen],
                    "o-" if mode == "cpu" else "s--",
                    ms=3,
                    color=COLORS[series],
                    label=f"kernel [{run_name}]" if series == "kernel" else series,
                )
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("spread sigma of the near-copy keys (sigma = 0 plotted at 3e-5)")
        ax.set_ylabel("systematic share of the error: bias / RMSE")
        ax.set_title(dtype)
        ax.legend(fontsize=5.5)
    plots.save(fig, figure)

    parts, findings = [], []
    for name, record in (("CPU", cpu), ("GPU", gpu)):
        if record is None:
            continue
        body = [
            [
                r["dtype"],
                f"{r['sigma']:g}",
                r["series"],
                f"{e(r['bias'])} ± {e(r['stderr'])}",
                f"{_share(r):+.2f}",
                e(r["rmse"]),
                "–" if r["p_near_one"] is None else f"{100 * r['p_near_one']:.0f}%",
            ]
            for r in record["rows"]
        ]
        headers = [
            "dtype",
            "sigma",
            "series",
            "relative bias ± s.e.",
            "bias / RMSE",
            "relative RMSE",
            "p < 1 → 1",
        ]
        parts.append(
            f"**{name}** ({record['meta']['device']}), {N_QUERIES} queries x {N_KEYS} keys, D={HEAD_DIM}, "
            f"{len(SEEDS)} seeds; the last column is the share of the p below 1 that round to exactly 1:\n\n"
            + table(headers, body)
        )
    if cpu is not None:
        for dtype in ("bf16", "fp16"):
            rows = {(r["series"], r["sigma"]): r for r in cpu["rows"] if r["dtype"] == dtype}
            worst = max(SIGMAS, key=lambda s: abs(_share(rows[("kernel arithmetic", s)])))
            low = max(SIGMAS, key=lambda s: abs(_share(rows[("everything in the input dtype", s)])))
            k = rows[("kernel arithmetic", worst)]
            findings.append(
                f"{dtype}: the kernel's arithmetic is most biased at sigma = {worst:g}, where "
                f"{100 * k['p_near_one']:.0f}% of the p below 1 round up to exactly 1: bias {e(k['bias'])} ± "
                f"{e(k['stderr'])} of the output, {_share(k):+.2f} of its RMSE. The Qiu-Yao max shift brings "
                f"that to {_share(rows[('kernel + Qiu-Yao max shift', worst)]):+.2f}, a row sum of the "
                f"rounded P to {_share(rows[('kernel + row sum of rounded P', worst)]):+.2f}. With every "
                f"quantity in {dtype} (their setting) the bias reaches "
                f"{_share(rows[('everything in the input dtype', low)]):+.2f} of the RMSE (sigma = {low:g}); "
                f"with the shift {_share(rows[('everything in the input dtype + max shift', low)]):+.2f}."
            )
    if gpu is not None:
        for dtype in ("fp16", "bf16"):  # each goes first: bf16 ends up the headline
            shares = {r["sigma"]: _share(r) for r in gpu["rows"] if r["dtype"] == dtype}
            worst = max(shares, key=lambda s: abs(shares[s]))
            findings.insert(
                0,
                f"GPU, {dtype}: the compiled kernel's bias / RMSE stays between {min(shares.values()):+.2f} "
                f"and {max(shares.values()):+.2f} over the sigma sweep (largest in size at sigma = "
                f"{worst:g}).",
            )
    markdown = (
        __doc__.split("\n", 2)[2].strip()
        + "\n\n"
        + "\n\n".join(parts)
        + f"\n\n![ties](img/numerics/{figure.name})"
    )
    return markdown, findings
