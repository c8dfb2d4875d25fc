"""E8. Calibrating the test tolerances.

core.tolerance passes a kernel result when max|kernel - truth| <= factor x max|eager - truth| + floor,
with factor 2 for out and lse and 3 for dq, dk, dv (eager = the same-dtype reference). This experiment
draws random problems the way the test suite does (shapes, GQA, causal or not, head dims, two input
distributions, fp16/bf16/fp32), runs the kernel, the float64 truth and the eager reference exactly as
packages/core/tests/helpers.py does, and records the ratio kernel error / eager error for every quantity:
the distribution that the factors must cover, and how much room they leave.
"""

from __future__ import annotations

import numpy as np
import torch

from numerics import inputs, plots
from numerics.markdown import table
from numerics.tensors import to_torch

TITLE = "E8. Tolerance calibration"

QUANTITIES = ("out", "lse", "dq", "dk", "dv")
CASES = {"cpu": 48, "gpu": 200}
MAX_N = {"cpu": 64, "gpu": 2048}
HEAD_DIMS = {"cpu": (16, 40, 64, 128), "gpu": (128,)}
# Query/key-value heads. On the GPU every kv_group is > 1 and every head dim 128 so that Triton compiles one
# specialisation per (dtype, causal): compiling dominates the GPU run's time.
HEADS = {"cpu": ((1, 1), (2, 1)), "gpu": ((4, 2), (8, 2))}


def draw_case(gen, mode) -> dict:
    n_q, n_k = (int(np.exp(gen.uniform(0, np.log(MAX_N[mode])))) for _ in range(2))
    hq, hkv = HEADS[mode][gen.integers(len(HEADS[mode]))]
    return {
        "dtype": ("fp16", "bf16", "fp32")[gen.integers(3)],
        "causal": bool(gen.integers(2)),
        "shape": [1, int(hq), int(hkv), n_q, n_k, int(gen.choice(HEAD_DIMS[mode]))],
        "dist": ("normal", "fa3_outliers")[gen.integers(2)],
        "seed": int(gen.integers(2**31)),
    }


def measure(case, device) -> dict:
    """The test suite's comparison: kernel, float64 truth and eager reference on the same inputs and dO."""
    import core
    from core.tolerance import POLICY, judge, largest_finite

    b, hq, hkv, n_q, n_k, d = case["shape"]
    gen = inputs.rng(case["seed"])
    draw = inputs.DISTRIBUTIONS[case["dist"]]
    dtype = case["dtype"]
    q, k, v = (
        to_torch(draw(gen, (b, h, n, d)), dtype, device) for h, n in ((hq, n_q), (hkv, n_k), (hkv, n_k))
    )
    dout = to_torch(inputs.normal(gen, (b, hq, n_q, d)), dtype, device)

    def run(fn, compute_dtype):
        leaves = [x.detach().to(compute_dtype or x.dtype).requires_grad_() for x in (q, k, v)]
        out, lse = fn(*leaves, causal=case["causal"], return_lse=True)
        (out * dout.to(out.dtype)).sum().backward()
        return [out.detach(), lse.detach(), *(x.grad for x in leaves)]

    kernel = run(core.attention, None)
    truth = run(core.attention_reference, torch.float64)
    eager = run(lambda *a, **kw: core.attention_reference(*a, **kw, compute_dtype=None), None)
    gradient_scale = largest_finite(*truth[2:])
    row = {**case, "ratio": {}, "needed": {}, "passes": {}}
    for i, quantity in enumerate(QUANTITIES):
        options = {"input_dtype": q.dtype} if quantity == "lse" else {}
        if i >= 2:
            options["family_scale"] = gradient_scale
        verdict = judge(quantity, kernel[i], truth[i], eager[i], **options)
        floor = verdict.bound - POLICY[q.dtype][quantity].factor * verdict.eager_error
        eager_error = verdict.eager_error if verdict.eager_error > 0 else None
        row["ratio"][quantity] = verdict.error / eager_error if eager_error else None
        # The smallest factor that would still pass this case, floor included.
        row["needed"][quantity] = max(verdict.error - floor, 0) / eager_error if eager_error else None
        row["passes"][quantity] = verdict.ok
    return row


def run(lab) -> dict:
    gen = inputs.rng(8)
    rows = [measure(draw_case(gen, lab.mode), lab.device) for _ in range(CASES[lab.mode])]
    from core.tolerance import POLICY

    factors = {dt: {q: POLICY[t][q].factor for q in QUANTITIES} for dt, t in (("fp16", torch.float16),
               ("bf16", torch.bfloat16), ("fp32", torch.float32))}  # fmt: skip
    return {"rows": rows, "factors": factors}


def _summary(record):
    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for quantity in QUANTITIES:
            chosen = [r for r in record["rows"] if r["dtype"] == dtype]
            ratios = np.array([r["ratio"][quantity] for r in chosen if r["ratio"][quantity] is not None])
            if ratios.size:
                out.append({
                    "dtype": dtype, "quantity": quantity, "n": len(chosen),
                    "median": float(np.median(ratios)),
                    "p90": float(np.quantile(ratios, 0.9)), "max": float(ratios.max()),
                    "needed": max(r["needed"][quantity] for r in chosen if r["needed"][quantity] is not None),
                    "factor": record["factors"][dtype][quantity],
                    "passed": sum(r["passes"][quantity] for r in chosen),
                })  # fmt: skip
    return out


def section(cpu, gpu, figure):
    records = [(name, r) for name, r in (("CPU", cpu), ("GPU", gpu)) if r is not None]
    fig, axes = plots.new(ncols=len(QUANTITIES), width=2.9, height=3.0)
    colors = {
        "fp16": plots.COLORS["kernel"],
        "bf16": plots.COLORS["low precision"],
        "fp32": plots.COLORS["floor"],
    }
    for ax, quantity in zip(axes, QUANTITIES):
        for name, record in records:
            for dtype, color in colors.items():
                ratios = [r["ratio"][quantity] for r in record["rows"] if r["dtype"] == dtype]
                ratios = np.sort([x for x in ratios if x is not None])
                if ratios.size:
                    ax.step(ratios, np.arange(1, ratios.size + 1) / ratios.size, where="post", color=color,
                            ls="-" if name == "GPU" else ":", label=f"{dtype} [{name}]")  # fmt: skip
            factor = record["factors"]["fp16"][quantity]
        ax.axvline(factor, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plots.plt.NullFormatter())
        ax.set_title(f"{quantity} (policy factor {factor:g})")
        ax.set_xlabel("kernel error / eager error")
        ax.set_ylabel("share of cases")
    axes[0].legend(fontsize=5.5)
    plots.save(fig, figure)

    parts, findings = [], []
    for name, record in records[::-1]:
        summary = _summary(record)
        cases = len(record["rows"])
        parts.append(
            f"**{name}** ({record['meta']['device']}), {cases} random cases. 'ratio' is kernel error / eager "
            "error; 'needed' the smallest factor that still passes every case with the policy's floor:\n\n"
            + table(
                [
                    "dtype",
                    "quantity",
                    "cases",
                    "median ratio",
                    "90%",
                    "max",
                    "needed",
                    "policy factor",
                    "passed",
                ],
                [
                    [
                        s["dtype"],
                        s["quantity"],
                        s["n"],
                        f"{s['median']:.2f}",
                        f"{s['p90']:.2f}",
                        f"{s['max']:.2f}",
                        f"{s['needed']:.2f}",
                        f"{s['factor']:g}",
                        f"{s['passed']}/{s['n']}",
                    ]
                    for s in summary
                ],
            )
        )
        failures = sum(s["n"] - s["passed"] for s in summary)
        tightest = max(summary, key=lambda s: s["needed"] / s["factor"])
        findings.append(
            f"{name}, {cases} random cases: {failures} verdicts fail. The kernel is usually more accurate "
            "than eager (median error ratios, fp16: "
            + ", ".join(f"{s['quantity']} {s['median']:.2f}" for s in summary if s["dtype"] == "fp16")
            + f"). The closest call is {tightest['dtype']} {tightest['quantity']}, which needs a factor of "
            f"{tightest['needed']:.2f} against the policy's {tightest['factor']:g}."
        )
    markdown = (
        __doc__.split("\n", 2)[2].strip()
        + "\n\n"
        + "\n\n".join(parts)
        + f"\n\n![tolerance](img/numerics/{figure.name})"
    )
    return markdown, findings
