"""E4. Logit scale, attention entropy, and the shifted-softmax bound.

With V the identity (n keys, head dim n) the output rows *are* the attention weights, so the kernel's
softmax can be checked entry by entry. Scaling the logits by a temperature c moves the rows from nearly
uniform (high entropy, narrow logit range) to nearly one-hot (low entropy, wide range). Blanchard, Higham
and Higham (2021) bound the componentwise relative error of the shifted softmax computed in a precision
with unit roundoff u by (n + 2 + 2(max x - min x)) u; the measured error is the largest relative error
over entries that are normal fp16 numbers (>= 2^-14: smaller ones underflow, which no relative bound
covers).
"""

from __future__ import annotations

import numpy as np

from numerics import baselines, emulator, inputs, kernel, plots, truth
from numerics.fit import power_law
from numerics.formats import FORMATS
from numerics.markdown import e, table
from numerics.metrics import as_f64
from numerics.tensors import to_numpy, to_torch

TITLE = "E4. Logit scale, entropy and the softmax bound"

N_KEYS = 128  # = head dim, so V can be the identity
N_QUERIES = 64
TEMPERATURES = np.geomspace(0.1, 30, 9)
SMALLEST = 2.0**-14  # smallest normal fp16 number
# The emulated sweep over n (V = I_n): the kernel's arithmetic vs a softmax done entirely in the input dtype.
N_SWEEP = (64, 128, 256, 512, 1024, 2048, 4096)
# ... with l a plain sum (the kernel Kahan-compensates it).
ALL_LOW = {**{q: "input" for q in ("scores", "m", "l", "alpha", "p", "acc")}, "l_kahan": False}


def componentwise_error(weights, true_weights) -> float:
    w, t = as_f64(weights), as_f64(true_weights)
    keep = t >= SMALLEST
    return float(np.max(np.abs(w[keep] - t[keep]) / t[keep]))


def softmax(logits) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def row_statistics(logits) -> tuple[float, float]:
    """Mean entropy (nats) and mean logit range (max - min) of the rows."""
    p = softmax(logits)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)
    return float(entropy.mean()), float(np.mean(logits.max(axis=-1) - logits.min(axis=-1)))


def run(lab) -> dict:
    gen = inputs.rng(404)
    q_raw, k_raw, _ = inputs.qkv(gen, 1, 1, N_QUERIES, N_KEYS, N_KEYS)
    identity = np.eye(N_KEYS)[None, None]
    rows = []
    for dtype in ("fp16", "bf16"):
        q, k, v = (to_torch(x, dtype, lab.device) for x in (q_raw, k_raw, identity))
        base_logits = to_numpy(q)[0, 0].astype(float) @ to_numpy(k)[0, 0].astype(float).T / np.sqrt(N_KEYS)
        for c in TEMPERATURES:
            scale = float(c / np.sqrt(N_KEYS))
            true_weights, _ = truth.forward(q, k, v, causal=False, sm_scale=scale)
            entropy, spread = row_statistics(c * base_logits)
            point = {"dtype": dtype, "temperature": float(c), "entropy": entropy, "range": spread}
            out = kernel.forward(q, k, v, sm_scale=scale, config=kernel.block_config(64, 64, N_KEYS))[0]
            rows.append(
                {**point, "series": "kernel", "error": componentwise_error(to_numpy(out), true_weights)}
            )
            eager = baselines.standard_attention(q, k, v, sm_scale=scale)
            rows.append(
                {
                    **point,
                    "series": "standard attention",
                    "error": componentwise_error(to_numpy(eager), true_weights),
                }
            )
            if not lab.on_gpu:
                arith = emulator.KERNEL.with_(block_m=64, block_n=64)
                emulated = emulator.forward(
                    *(to_numpy(x) for x in (q, k, v)), dtype, arith, sm_scale=scale
                ).out
                rows.append({**point, "series": "kernel arithmetic (emulator)",
                             "error": componentwise_error(emulated, true_weights)})  # fmt: skip
    sweep = [] if lab.on_gpu else _n_sweep()
    return {"n_keys": N_KEYS, "n_queries": N_QUERIES, "rows": rows, "n_sweep": sweep}


def _n_sweep() -> list[dict]:
    """Componentwise error against n at the default scale, emulated with V = I_n (a value head dim of n,
    which the emulator allows and the kernel does not)."""
    rows = []
    for n in N_SWEEP:
        q_raw, k_raw, _ = inputs.qkv(inputs.rng(n), 1, 1, 32, n, 64)
        for dtype in ("fp16", "bf16"):
            q, k = (to_numpy(to_torch(x, dtype)) for x in (q_raw, k_raw))
            true_weights = softmax(q[0, 0].astype(float) @ k[0, 0].astype(float).T / 8)
            for name, changes in (
                ("kernel arithmetic", {}),
                ("softmax entirely in the input dtype", ALL_LOW),
            ):
                arith = emulator.KERNEL.with_(block_m=32, block_n=64, **changes)
                out = emulator.forward(q, k, np.eye(n, dtype=q.dtype)[None, None], dtype, arith).out
                error = componentwise_error(out[0, 0], true_weights)
                rows.append({"dtype": dtype, "n": n, "series": name, "error": error})
    return rows


def _bound(n, spread, fmt):
    return (n + 2 + 2 * np.asarray(spread)) * FORMATS[fmt].unit_roundoff


def section(cpu, gpu, figure):
    record = gpu or cpu
    fig, axes = plots.new(ncols=3, width=4.2, height=3.5)
    colors = {"kernel": plots.COLORS["kernel"], "standard attention": plots.COLORS["standard"],
              "kernel arithmetic (emulator)": plots.COLORS["emulator"]}  # fmt: skip
    for ax, dtype in zip(axes, ("fp16", "bf16")):
        points = [r for r in record["rows"] if r["dtype"] == dtype]
        if cpu is not None and gpu is not None:
            points += [
                r
                for r in cpu["rows"]
                if r["dtype"] == dtype and r["series"] == "kernel arithmetic (emulator)"
            ]
        for series, color in colors.items():
            chosen = sorted((r for r in points if r["series"] == series), key=lambda r: r["range"])
            if chosen:
                ax.plot(
                    [r["range"] for r in chosen],
                    [r["error"] for r in chosen],
                    "o-",
                    ms=3,
                    color=color,
                    label=f"kernel [{'GPU' if gpu is not None else 'interpreter'}]"
                    if series == "kernel"
                    else series,
                )
        spreads = np.array(sorted(r["range"] for r in points))
        for fmt, style in ((dtype, "--"), ("fp32", ":")):
            ax.plot(spreads, _bound(record["n_keys"], spreads, fmt), style, color=plots.COLORS["bound"],
                    label=f"BHH bound, u = u({fmt})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mean logit range  max x - min x")
        ax.set_ylabel("max componentwise relative error of P")
        ax.set_title(f"{dtype}, n = {record['n_keys']} keys")
        ax.legend(fontsize=6)
    if cpu is not None:
        ax = axes[2]
        sweep_colors = {
            ("fp16", "kernel arithmetic"): plots.COLORS["emulator"],
            ("fp16", "softmax entirely in the input dtype"): plots.COLORS["low precision"],
            ("bf16", "kernel arithmetic"): plots.COLORS["kernel"],
            ("bf16", "softmax entirely in the input dtype"): plots.COLORS["standard"],
        }
        for (dtype, series), color in sweep_colors.items():
            chosen = [r for r in cpu["n_sweep"] if r["dtype"] == dtype and r["series"] == series]
            label = f"{dtype}: {series}"
            ax.plot(
                [r["n"] for r in chosen], [r["error"] for r in chosen], "o-", ms=3, color=color, label=label
            )
        ns = np.array(N_SWEEP)
        ax.plot(
            ns,
            (ns + 2) * FORMATS["fp16"].unit_roundoff,
            "--",
            color=plots.COLORS["bound"],
            label="(n + 2) u(fp16)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("keys n (temperature 1)")
        ax.set_ylabel("max componentwise relative error of P")
        ax.set_title("emulated, V = identity")
        ax.legend(fontsize=5.5)
    plots.save(fig, figure)

    body = []
    for r in sorted(record["rows"], key=lambda r: (r["dtype"], r["series"], r["temperature"])):
        bound = _bound(record["n_keys"], r["range"], r["dtype"])
        body.append([r["dtype"], r["series"], f"{r['temperature']:.2g}", f"{r['entropy']:.2f}",
                     f"{r['range']:.1f}", e(r["error"]), e(bound)])  # fmt: skip
    findings = []
    for dtype in ("fp16", "bf16"):
        kernel_rows = [r for r in record["rows"] if r["dtype"] == dtype and r["series"] == "kernel"]
        worst = max(kernel_rows, key=lambda r: r["error"])
        u = FORMATS[dtype].unit_roundoff
        findings.append(
            f"{dtype}: the kernel's softmax weights stay within {worst['error'] / u:.1f} u({dtype}) of the "
            "truth entry by entry at every temperature (entropy "
            f"{min(r['entropy'] for r in kernel_rows):.2f} to {max(r['entropy'] for r in kernel_rows):.2f} "
            f"nats), while the BHH bound at u({dtype}) is "
            f"{_bound(record['n_keys'], worst['range'], dtype) / worst['error']:.0f}x larger there: the "
            "error is the rounding of P and of the output, independent of the logit range, because the "
            "shift and the exponent are fp32."
        )
    if cpu is not None:
        for series in ("kernel arithmetic", "softmax entirely in the input dtype"):
            chosen = [r for r in cpu["n_sweep"] if r["dtype"] == "fp16" and r["series"] == series]
            law = power_law([r["n"] for r in chosen], [r["error"] for r in chosen])
            findings.append(
                f"fp16, {series}: the componentwise error grows as n^{law.exponent:.2f} [{law.low:.2f}, "
                f"{law.high:.2f}] (the bound's worst case is linear in n)."
            )
    markdown = (
        __doc__.split("\n", 2)[2].strip()
        + f"\n\n{record['n_queries']} queries, n = {record['n_keys']} keys, N(0,1) inputs, temperature c "
        "scales the default 1/sqrt(D).\n\n"
        + table(
            ["dtype", "series", "c", "entropy (nats)", "logit range", "max rel. error", "bound at u(dtype)"],
            body,
        )
        + f"\n\n![entropy](img/numerics/{figure.name})"
    )
    return markdown, findings
