"""E7. The backward pass: gradient error against N, its sources, and the division-free P.

Part A measures dq, dk and dv (relative RMSE against the float64 gradients of sum(out * dO)) for the
kernel, the eager same-dtype reference (autograd through core.attention_reference(compute_dtype=None))
and, emulated, the kernel with each of its two backward casts removed: P^T before the dV dot and dS
before the dQ and dK dots.

Part B isolates how P is recomputed. The kernel's backward forms P = exp2(s - lse2) from the base-2 LSE
the forward saved: no division, but the subtraction carries the rounding of lse2, an absolute error of
about u32 |lse2| in the exponent, i.e. a relative error in P that grows with the logits' magnitude.
Blanchard, Higham and Higham warn that this division-free form can lose accuracy; the alternative is
exp2(s - m) / l. Both are measured on fp32 scores with a common offset b added to every logit, against
the float64 softmax of the same fp32 scores, together with the natural-log LSE round trip
(lse = lse2 ln 2 saved, lse log2 e reloaded) of earlier versions of the kernel. This is the fp16/bf16
backward; float32 inputs now remove the error measured here with a two-part LSE and two-part scores
(docs/design.md, "Precision paths").
"""

from __future__ import annotations

import numpy as np
import torch

from numerics import emulator, inputs, kernel, plots, truth
from numerics.fit import power_law
from numerics.markdown import e, table
from numerics.metrics import relative_rmse
from numerics.tensors import to_numpy, to_torch

TITLE = "E7. Backward pass"

HEAD_DIM = 64
GRADS = ("dq", "dk", "dv")
N_VALUES = {"cpu": [64, 128, 256, 512, 1024], "gpu": [256, 512, 1024, 2048, 4096, 8192, 16384]}
KERNEL_MAX_N = {"cpu": 256, "gpu": 16384}  # the interpreter's backward runs 16 x 16 tiles: slow
EAGER_MAX_N = {"cpu": 1024, "gpu": 8192}
HEADS = {"cpu": 1, "gpu": 2}
SEEDS = (0, 1)
TILES = (64, 64)
ABLATIONS = {
    "kernel arithmetic (emulator)": {},
    "dS not rounded": {"ds_cast": "fp32"},
    "P not rounded in dV": {"p_cast": "fp32"},
    "neither rounded": {"ds_cast": "fp32", "p_cast": "fp32"},
}
OFFSETS = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4)


def _eager(q, k, v, dout) -> dict:
    from core import attention_reference

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = attention_reference(*leaves, causal=False, compute_dtype=None)
    out.backward(dout)
    return dict(zip(GRADS, (x.grad for x in leaves), strict=True))


def run(lab) -> dict:
    rows = []
    heads = HEADS[lab.mode]
    for dtype in ("fp16", "bf16"):
        for n in N_VALUES[lab.mode]:
            for seed in SEEDS:
                gen = inputs.rng(700 + seed)
                q, k, v = (to_torch(x, dtype, lab.device) for x in inputs.qkv(gen, 1, heads, n, n, HEAD_DIM))
                dout = to_torch(inputs.normal(gen, (1, heads, n, HEAD_DIM)), dtype, lab.device)
                true = dict(zip(GRADS, truth.backward(q, k, v, dout, causal=False), strict=True))
                point = {"dtype": dtype, "n": n, "seed": seed}

                def record(series, grads, point=point, true=true):
                    for g in GRADS:
                        rows.append(
                            {**point, "series": series, "grad": g, "error": relative_rmse(grads[g], true[g])}
                        )

                if n <= KERNEL_MAX_N[lab.mode]:
                    record("kernel", kernel.forward_backward(q, k, v, dout))
                if n <= EAGER_MAX_N[lab.mode]:
                    record("eager same-dtype reference", _eager(q, k, v, dout))
                if not lab.on_gpu:
                    arrays = [to_numpy(x) for x in (q, k, v)]
                    fwd = emulator.forward(
                        *arrays, dtype, emulator.KERNEL.with_(block_m=TILES[0], block_n=TILES[1])
                    )
                    for name, changes in ABLATIONS.items():
                        arith = emulator.KERNEL.with_(block_m=TILES[0], block_n=TILES[1], **changes)
                        got = emulator.backward(*arrays, fwd.out, to_numpy(dout), fwd.saved_lse, dtype, arith)
                        record(name, {g: getattr(got, g) for g in GRADS})
                if lab.on_gpu:
                    torch.cuda.empty_cache()
    return {
        "head_dim": HEAD_DIM,
        "heads": heads,
        "rows": rows,
        "reconstruction": [] if lab.on_gpu else _reconstruction(),
    }


def _reconstruction() -> list[dict]:
    """Relative error of the recomputed P, three ways, for logits offset by b (natural units)."""
    gen = inputs.rng(77)
    z = gen.standard_normal((64, 1024)) * 2
    rows = []
    for b in OFFSETS:
        s2 = ((z + b) * emulator.LOG2E).astype(np.float32)  # the kernel's base-2 scores, fp32
        exact = np.exp2(s2.astype(np.float64) - s2.max(axis=1, keepdims=True))
        exact /= exact.sum(axis=1, keepdims=True)
        m = s2.max(axis=1, keepdims=True)
        l = np.exp2(s2 - m).sum(axis=1, keepdims=True, dtype=np.float32)
        lse2 = m + np.log2(l)
        lse_natural = lse2 * np.float32(emulator.LN2)
        ways = {
            "division: exp2(s - m) / l": np.exp2(s2 - m) / l,
            "division-free: exp2(s - lse2) (the kernel)": np.exp2(s2 - lse2),
            "division-free via natural LSE (lse log2 e)": np.exp2(
                s2 - lse_natural * np.float32(emulator.LOG2E)
            ),
        }
        keep = exact > 1e-6
        for name, p in ways.items():
            rel = np.abs(p.astype(np.float64)[keep] - exact[keep]) / exact[keep]
            rows.append({"offset": b, "lse2": float(np.abs(lse2).mean()), "series": name,
                         "max": float(rel.max()), "rms": float(np.sqrt(np.mean(rel**2)))})  # fmt: skip
    return rows


SERIES_COLORS = {
    "kernel": plots.COLORS["kernel"],
    "eager same-dtype reference": plots.COLORS["standard"],
    "kernel arithmetic (emulator)": plots.COLORS["emulator"],
    "dS not rounded": plots.COLORS["remedy"],
    "P not rounded in dV": plots.COLORS["low precision"],
    "neither rounded": plots.COLORS["floor"],
}


def _fits(record, mode):
    fits = {}
    for r in record["rows"]:
        fits.setdefault((mode, r["dtype"], r["series"], r["grad"]), []).append((r["n"], r["error"]))
    return {key: (pts, power_law(*zip(*pts))) for key, pts in fits.items() if len({n for n, _ in pts}) > 2}


def section(cpu, gpu, figure):
    fits = {}
    for mode, record in (("cpu", cpu), ("gpu", gpu)):
        if record is not None:
            fits.update(_fits(record, mode))
    fig, axes = plots.new(ncols=4, nrows=2, width=3.4, height=3.0)
    for row, dtype in enumerate(("fp16", "bf16")):
        for col, grad in enumerate(GRADS):
            ax = axes[row * 4 + col]
            for (mode, fit_dtype, series, fit_grad), (pts, law) in fits.items():
                if fit_dtype != dtype or fit_grad != grad:
                    continue
                x, y = np.array(pts).T
                ax.scatter(x, y, s=8, marker=plots.MARKERS[mode], color=SERIES_COLORS[series], alpha=0.6)
                xs = np.unique(x)
                ax.plot(
                    xs,
                    law.prefactor * xs**law.exponent,
                    color=SERIES_COLORS[series],
                    lw=0.9,
                    ls="-" if mode == "cpu" else "--",
                    label=f"{series} [{mode}] N^{law.exponent:+.2f}",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dtype} {grad}")
            ax.set_xlabel("N")
            ax.set_ylabel("relative RMSE")
            ax.legend(fontsize=4.5)
    if cpu is not None:
        for ax, stat in ((axes[3], "max"), (axes[7], "rms")):
            for series in dict.fromkeys(r["series"] for r in cpu["reconstruction"]):
                chosen = [r for r in cpu["reconstruction"] if r["series"] == series]
                ax.plot([r["lse2"] for r in chosen], [r[stat] for r in chosen], "o-", ms=3, label=series)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("mean |lse2| (base-2 units)")
            ax.set_ylabel(f"{stat} relative error of P")
            ax.set_title("recomputing P (fp32)")
            ax.legend(fontsize=5)
    plots.save(fig, figure)

    body = []
    for (mode, dtype, series, grad), (pts, law) in sorted(
        fits.items(), key=lambda kv: (kv[0][1], kv[0][3], kv[0][2])
    ):
        at_max = np.mean([err for n, err in pts if n == max(n for n, _ in pts)])
        body.append(
            [
                dtype,
                grad,
                series,
                mode,
                f"{min(n for n, _ in pts)}–{max(n for n, _ in pts)}",
                str(law),
                e(at_max, 2),
            ]
        )
    findings = []
    for dtype in ("fp16", "bf16"):
        source = "gpu" if gpu is not None else "cpu"
        parts = []
        for grad in GRADS:
            k_fit, e_fit = (
                fits.get((source, dtype, "kernel", grad)),
                fits.get((source, dtype, "eager same-dtype reference", grad)),
            )
            if k_fit and e_fit:
                parts.append(f"{grad} N^{k_fit[1].exponent:+.2f} (eager N^{e_fit[1].exponent:+.2f})")
        if parts:
            findings.append(
                f"{dtype} gradients, relative RMSE against N ({source}): " + "; ".join(parts) + "."
            )
        if cpu is not None:
            ablation = {}
            for series in ABLATIONS:
                for grad in GRADS:
                    pts = [
                        r["error"]
                        for r in cpu["rows"]
                        if (r["dtype"], r["series"], r["grad"], r["n"])
                        == (dtype, series, grad, max(N_VALUES["cpu"]))
                    ]
                    ablation[(series, grad)] = np.mean(pts)
            base = "kernel arithmetic (emulator)"
            findings.append(
                f"{dtype} at N={max(N_VALUES['cpu'])}: keeping dS in fp32 changes dq/dk error by "
                f"{ablation[('dS not rounded', 'dq')] / ablation[(base, 'dq')]:.2f}x/"
                f"{ablation[('dS not rounded', 'dk')] / ablation[(base, 'dk')]:.2f}x; keeping P^T in fp32 "
                f"changes dv by {ablation[('P not rounded in dV', 'dv')] / ablation[(base, 'dv')]:.2f}x. "
                "What remains is each gradient's final rounding to the input dtype (and the rounded O and dO "
                "inside Delta)."
            )
    if cpu is not None:
        rec = {(r["series"], r["offset"]): r for r in cpu["reconstruction"]}
        big = OFFSETS[-1]
        findings.append(
            "Recomputing P division-free from the saved lse2 is as accurate as dividing by l for moderate "
            "logits (max relative error "
            f"{e(rec[('division-free: exp2(s - lse2) (the kernel)', 0.0)]['max'])} vs "
            f"{e(rec[('division: exp2(s - m) / l', 0.0)]['max'])} at offset 0) and loses accuracy in "
            f"proportion to |lse2| ({e(rec[('division-free: exp2(s - lse2) (the kernel)', big)]['max'])} vs "
            f"{e(rec[('division: exp2(s - m) / l', big)]['max'])} at offset {big:g}), as Blanchard, Higham "
            "and Higham predict; still far below one fp16/bf16 rounding of P or dS until |logits| reach "
            "~1e4. The old natural-LSE round trip added "
            f"{e(rec[('division-free via natural LSE (lse log2 e)', 0.0)]['max'])} at offset 0."
        )
    markdown = (
        __doc__.split("\n", 2)[2].strip()
        + f"\n\nD={HEAD_DIM}, non-causal, N(0,1) inputs and dO, {len(SEEDS)} seeds. Power laws of relative "
        "RMSE against N:\n\n"
        + table(["dtype", "grad", "series", "run", "N", "exponent [95% CI]", "error at largest N"], body)
        + f"\n\n![backward](img/numerics/{figure.name})"
    )
    return markdown, findings
