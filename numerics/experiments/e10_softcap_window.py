"""E10. Softcap near saturation, and window boundaries.

`softcap=C` replaces each scaled score s by C tanh(s / C) before the softmax (Gemma 2's logit
softcapping); `window_size=(left, right)` is FlashAttention's sliding window.

Where the kernel caps, and in which precision: every Triton kernel takes its capped scores from one
function, `_softcapped_scores` (core/kernels/shared.py), so the forward and both backward passes compute
the same numbers. The score tile's raw dot q.k (exact fp16/bf16 products summed in float32) is multiplied
by sm_scale / C and rounded to float32 (x); tanh(x) is evaluated in float32 (for fp16/bf16 inputs from
one exp2, as (1 - e) / (1 + e) with e = exp(-2|x|), and by its series below |x| = 2^-5; about 1e-6
relative by its docstring); the result t is multiplied by C log2(e), the kernels' base-2 scale, and
rounded to float32. Masking, the running max and sum, and exp2 then work on these float32 capped scores
as they do without a cap: the first rounding to the input dtype is still P's, before P.V, then the
output's. The backward recomputes the same capped scores and multiplies dS by the slope 1 - t^2, in
float32, before dS is rounded for the dQ and dK dots.

What to expect. An error ds in a score reaches the capped score as (1 - tanh^2(s / C)) ds: tanh' -> 0
compresses errors in the scores exactly as it compresses the differences between them, so a rounding
before the tanh costs less the deeper the saturation, while roundings after it (of the tanh, and of
C tanh) are not compressed, about u C each. The eager same-dtype reference
(`core.attention_reference(compute_dtype=None)`, FlashAttention's `attention_ref(upcast=False)`) rounds
s, s / C, the tanh and C tanh each to the input dtype; the kernel rounds none of them below float32. What
the cap changes for the kernel is the shape of the rows: a small cap squeezes every logit into [-C, C]
and flattens the rows, and the size of P's rounding error depends on how a row spreads its weight (E4,
E5). Deep in saturation a row's capped scores pile up just below +C and just above -C, so most P sit near
1 or near e^(-2C), and their roundings no longer average out. The backward's slope 1 - t^2 loses relative
accuracy as t -> 1 (t is good to a few float32 ulps, the slope is about 4 e^(-2|x|)), but only where the
slope, and with it the key's share of dS, is tiny.

(A) Softcap sweep: q ~ N(0, 10^2), k, v, dO ~ N(0, 1), so the scaled scores s = q.k / sqrt(D) have RMS
10; C from 1000 (mean slope 0.9999: no effect) to 0.3 (over 90% of the scores saturated), and no cap.
Every series is compared with the float64 `core.attention_reference` on the same rounded inputs: the
kernel (`core.attention` with the portable family forced, `core.testing.use_family`: the family that runs
softcap and windows at these shapes, so that the points without a cap or a window run the same kernels),
the eager same-dtype reference, and the fp32-inside floor (`core.attention_reference` in float32, output
and gradients rounded once to the input dtype). The
capped logits themselves are measured through rows that see one key (window_size (0, 0), Nq = Nk): such a
row's LSE is its one capped score.

(B) Window boundaries: window_size (w - 1, 0) with Nq = Nk + Z, bottom-right aligned, so the first Z
queries see no key, the next ones 1, 2, ..., w - 1 keys, the rest exactly w; errors over the rows that
see exactly w keys (no window: all Nk), q, k, v, dO ~ N(0, 1), no cap. A row that sees one key has
P = 1 exactly, so its output is v and its dq and dk vanish (a softmax over one score does not depend on
it); a row that sees none must output exactly 0, with LSE -inf and dq 0.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from numerics import inputs, kernel, plots
from numerics.formats import FORMATS
from numerics.markdown import e, table
from numerics.metrics import as_f64, relative_rmse
from numerics.tensors import to_torch

TITLE = "E10. Softcap near saturation, and window boundaries"

GRADS = ("dq", "dk", "dv")
SERIES = ("kernel", "eager same-dtype reference", "fp32 inside (floor)")
DTYPES = ("fp16", "bf16")
# The scaled scores s = q.k / sqrt(D) before capping have this RMS (q is drawn N(0, SCORE_RMS^2), k N(0, 1)),
# so that the sweep runs from caps far above every score (no effect) to caps far below most of them.
SCORE_RMS = 10.0
# 0: no cap. 0.3 and 0.32 saturate alike but put e^(-2C), the weight of a row's keys capped at -C against
# those at +C, almost half a bf16 spacing and almost on a bf16 number respectively (section: _grid_offset).
SOFTCAPS = (0.0, 1000.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.32, 0.3)
# A score counts as saturated where the cap's slope 1 - tanh^2(s / C) is below this (|s| > about 3 C).
SATURATED_SLOPE = 0.01
# Part B: window_size (w - 1, 0) with Nq = Nk + EMPTY_ROWS, bottom-right aligned, so the first EMPTY_ROWS
# queries see no key, the next w - 1 see 1 .. w - 1 keys and every later one exactly w; w = 0 stands for
# no window (every query sees all Nk keys).
WINDOWS = {"cpu": (1, 2, 4, 8, 16, 32, 64, 128, 0), "gpu": (1, 2, 4, 8, 16, 64, 256, 1024, 0)}
EMPTY_ROWS = {"cpu": 16, "gpu": 64}


def _shape(lab):
    """(heads, keys, head dim), seeds."""
    return lab.pick((1, 256, 64), (4, 4096, 128)), lab.pick((0,), (0, 1))


def _passes(core, q, k, v, dout, **features) -> dict:
    """series -> out, lse and the gradients of sum(out * dout): the kernel (core.attention on the portable
    family), the float64 truth, the eager same-dtype reference and the fp32-inside floor (every step in
    float32, out and gradients rounded once to the input dtype), all with the same window and softcap."""
    dtype = q.dtype

    def run(fn, leaf_dtype, family=None, **options):
        leaves = [x.detach().to(leaf_dtype).requires_grad_() for x in (q, k, v)]
        with family or contextlib.nullcontext():
            out, lse = fn(*leaves, causal=False, return_lse=True, **features, **options)
            out.backward(dout.to(out.dtype))
        got = {
            "out": out.detach(),
            "lse": lse.detach(),
            **dict(zip(GRADS, (x.grad for x in leaves), strict=True)),
        }
        if leaf_dtype == torch.float32 and dtype != torch.float32:
            got = {name: x if name == "lse" else x.to(dtype) for name, x in got.items()}
        return got

    return {
        "truth": run(core.attention_reference, torch.float64),
        "kernel": run(core.attention, dtype, family=_portable()),
        "eager same-dtype reference": run(core.attention_reference, dtype, compute_dtype=None),
        "fp32 inside (floor)": run(core.attention_reference, torch.float32, compute_dtype=torch.float32),
    }


def _portable():
    """Runs core.attention, forward and backward, on the portable family: the family that runs softcap and
    windows at these shapes, so forcing it keeps the no-cap and no-window points on the same kernel (on an
    sm_90 GPU a plain fp16/bf16 call at D 128 would otherwise take the hopper family)."""
    from core.testing import use_family

    return use_family("portable")


def _draw(lab, seed, dtype, n_queries, n_keys, q_scale=1.0):
    """q, k, v, dO: N(0, 1) draws rounded to `dtype`, q scaled by q_scale before the rounding."""
    heads, _, head_dim = _shape(lab)[0]
    gen = inputs.rng(1000 + seed)
    q, k, v = inputs.qkv(gen, 1, heads, n_queries, n_keys, head_dim)
    dout = inputs.normal(gen, (1, heads, n_queries, head_dim))
    return [to_torch(x, dtype, lab.device) for x in (q * q_scale, k, v, dout)]


def run(lab) -> dict:
    core = kernel.load(lab.mode)
    (heads, n, head_dim), seeds = _shape(lab)
    softcap_rows, logit_rows, window_rows, empty_rows = [], [], [], []
    for dtype in DTYPES:
        for seed in seeds:
            q, k, v, dout = _draw(lab, seed, dtype, n, n, q_scale=SCORE_RMS)
            for softcap in SOFTCAPS:
                softcap_rows += _softcap_point(core, q, k, v, dout, dtype, seed, softcap)
                logit_rows += _logit_point(core, q, k, v, dtype, seed, softcap)
                if lab.on_gpu:
                    torch.cuda.empty_cache()
        q, k, v, dout = _draw(lab, 0, dtype, n + EMPTY_ROWS[lab.mode], n)
        for window in WINDOWS[lab.mode]:
            rows, empty = _window_point(core, q, k, v, dout, dtype, window)
            window_rows += rows
            empty_rows += empty
            if lab.on_gpu:
                torch.cuda.empty_cache()
    return {
        "heads": heads,
        "n": n,
        "head_dim": head_dim,
        "score_rms": SCORE_RMS,
        "empty_rows": EMPTY_ROWS[lab.mode],
        "softcap": softcap_rows,
        "logits": logit_rows,
        "window": window_rows,
        "empty": empty_rows,
    }


def _score_shape(q, k, softcap) -> dict:
    """How much the cap bends these scores: the mean slope 1 - tanh^2(s / C) over every score, the share
    of saturated scores, and the mean entropy (nats) of the float64 softmax rows."""
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if softcap > 0:
        slope = 1 - torch.tanh(s / softcap) ** 2
        s = softcap * torch.tanh(s / softcap)
    else:
        slope = torch.ones_like(s)
    p = torch.softmax(s, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return {
        "slope": float(slope.mean()),
        "saturated": float((slope < SATURATED_SLOPE).double().mean()),
        "entropy": float(entropy.mean()),
    }


def _softcap_point(core, q, k, v, dout, dtype, seed, softcap) -> list[dict]:
    got = _passes(core, q, k, v, dout, softcap=softcap)
    truth = got.pop("truth")
    point = {"dtype": dtype, "softcap": softcap, "seed": seed, **_score_shape(q, k, softcap)}
    rows = []
    for series, x in got.items():
        errors = {name: relative_rmse(x[name], truth[name]) for name in ("out", *GRADS)}
        errors["lse"] = float(np.sqrt(np.mean((as_f64(x["lse"]) - as_f64(truth["lse"])) ** 2)))
        rows.append({**point, "series": series, **errors})
    return rows


def _logit_point(core, q, k, v, dtype, seed, softcap) -> list[dict]:
    """The capped logits themselves, as each series computes them: with window_size (0, 0) and Nq = Nk
    query i sees key i alone, so its LSE is its one capped score, cap(q_i . k_i / sqrt(D)) (its output is
    v_i; no softmax rounding enters). Absolute error in natural-log units = relative error of that key's
    exp(score)."""
    features = {"causal": False, "window_size": (0, 0), "softcap": softcap, "return_lse": True}
    with _portable():
        kernel_lse = core.attention(q, k, v, **features)[1]
    lse = {
        "truth": core.attention_reference(q, k, v, **features)[1],
        "kernel": kernel_lse,
        "eager same-dtype reference": core.attention_reference(q, k, v, **features, compute_dtype=None)[1],
        "fp32 inside (floor)": core.attention_reference(
            *(x.float() for x in (q, k, v)), **features, compute_dtype=torch.float32
        )[1],
    }
    truth = as_f64(lse.pop("truth"))
    rows = []
    for series, x in lse.items():
        error = np.abs(as_f64(x) - truth)
        rows.append({"dtype": dtype, "softcap": softcap, "seed": seed, "series": series,
                     "rms": float(np.sqrt(np.mean(error**2))), "max": float(error.max())})  # fmt: skip
    return rows


def _relative(x, truth) -> float | None:
    """relative_rmse, or None where the truth is exactly 0 (one visible key: dq and dk vanish, since a
    softmax over one score does not depend on it)."""
    return relative_rmse(x, truth) if bool((truth != 0).any()) else None


def _window_point(core, q, k, v, dout, dtype, window) -> tuple[list[dict], list[dict]]:
    """Errors of the rows that see exactly `window` keys (all Nk with window 0), and the exactness checks
    of the rows that see none."""
    from core.reference import visible_keys_mask

    window_size = (window - 1, 0) if window else (-1, -1)
    got = _passes(core, q, k, v, dout, window_size=window_size)
    truth = got.pop("truth")
    n_queries, n_keys = q.shape[2], k.shape[2]
    visible = visible_keys_mask(n_queries, n_keys, False, device=q.device, window_size=window_size)
    count = visible.sum(-1)
    full = count == (window or n_keys)
    rows = []
    for series, x in got.items():
        out, true_out = x["out"][:, :, full], truth["out"][:, :, full]
        lse_error = np.abs(as_f64(x["lse"][:, :, full]) - as_f64(truth["lse"][:, :, full]))
        rows.append({
            "dtype": dtype, "window": window, "series": series, "rows": int(full.sum()),
            "out": relative_rmse(out, true_out),
            "out_max": float(np.abs(as_f64(out) - as_f64(true_out)).max()),
            # Bit-identical to the correctly rounded truth: all of it where one key is visible (P = 1).
            "exact": float((out == true_out.to(out.dtype)).double().mean()),
            "lse_max": float(lse_error.max()),
            "dq": _relative(x["dq"][:, :, full], truth["dq"][:, :, full]),
            "dq_max": float(np.abs(as_f64(x["dq"][:, :, full]) - as_f64(truth["dq"][:, :, full])).max()),
            "dk": _relative(x["dk"], truth["dk"]),
            "dv": _relative(x["dv"], truth["dv"]),
        })  # fmt: skip
    none = count == 0
    checks = []
    if none.any():
        x = got["kernel"]
        checks.append({
            "dtype": dtype, "window": window, "rows": int(none.sum()),
            "out_zero": bool((x["out"][:, :, none] == 0).all()),
            "lse_neg_inf": bool((x["lse"][:, :, none] == float("-inf")).all()),
            "dq_zero": bool((x["dq"][:, :, none] == 0).all()),
            "finite": bool(all(torch.isfinite(x[name]).all() for name in ("out", *GRADS))),
        })  # fmt: skip
    return rows, checks


KERNEL, EAGER, FLOOR = SERIES
SERIES_COLORS = {
    KERNEL: plots.COLORS["kernel"],
    EAGER: plots.COLORS["standard"],
    FLOOR: plots.COLORS["floor"],
}
DTYPE_LINES = {"fp16": "-", "bf16": "--"}


def _mean(rows, keys, values) -> dict:
    """(values of `keys`) -> {value: its mean over the rows that share them (the seeds), None without any}."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    means = {}
    for key, chosen in groups.items():
        means[key] = {}
        for value in values:
            xs = [r[value] for r in chosen if r[value] is not None]
            means[key][value] = float(np.mean(xs)) if xs else None
    return means


class _Summary:
    """One run's records averaged over seeds, with the ratios the tables and findings quote."""

    def __init__(self, record):
        self.record = record
        self.sc = _mean(record["softcap"], ("dtype", "softcap", "series"),
                        ("slope", "saturated", "entropy", "out", "lse", *GRADS))  # fmt: skip
        self.lg = _mean(record["logits"], ("dtype", "softcap", "series"), ("rms", "max"))
        self.wn = _mean(record["window"], ("dtype", "window", "series"),
                        ("rows", "out", "exact", "lse_max", "dq", "dq_max", "dk", "dv"))  # fmt: skip
        self.caps = [c for c in SOFTCAPS if (DTYPES[0], c, KERNEL) in self.sc]
        self.windows = [w for w in WINDOWS[record["meta"]["mode"]] if (DTYPES[0], w, KERNEL) in self.wn]

    def cap(self, dtype, softcap, series=KERNEL, value="out"):
        return self.sc[(dtype, softcap, series)][value]

    def cap_ratio(self, dtype, softcap, series=KERNEL, value="out"):
        """series' error / the fp32-inside floor's, in the softcap sweep."""
        return self.cap(dtype, softcap, series, value) / self.cap(dtype, softcap, FLOOR, value)

    def logit(self, dtype, softcap, series):
        return self.lg[(dtype, softcap, series)]["rms"]

    def window(self, dtype, w, series=KERNEL, value="out"):
        return self.wn[(dtype, w, series)][value]

    def window_ratio(self, dtype, w, value="out"):
        floor = self.window(dtype, w, FLOOR, value)
        return self.window(dtype, w, KERNEL, value) / floor if floor else None


def _cap(softcap) -> str:
    return f"{softcap:g}" if softcap > 0 else "off"


def _at(softcap) -> str:
    return f"at C = {softcap:g}" if softcap > 0 else "without a cap"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _grid_offset(x: float, dtype: str) -> float:
    """How far x lies from the nearest `dtype` number, in units of the spacing there (0 to 1/2)."""
    fmt = FORMATS[dtype]
    spacing = 2.0 ** (math.floor(math.log2(x)) - fmt.significand_bits + 1)
    return abs(x - float(fmt.round(np.array([x], dtype=np.float32))[0])) / spacing


def _plot(summaries, figure):
    fig, axes = plots.new(ncols=3, nrows=2, width=4.0, height=3.2)
    off = 3 * max(SOFTCAPS)  # where "no cap" sits on the softcap axis: right of the largest cap
    for mode, s in summaries:
        n = s.record["n"]
        for dtype, ls in DTYPE_LINES.items():
            for series, color in SERIES_COLORS.items():
                style = {"color": color, "ls": ls, "marker": plots.MARKERS[mode], "ms": 3, "lw": 0.9}
                label = f"{series} {dtype} [{mode}]"
                xs = [c or off for c in s.caps]
                axes[0].plot(xs, [s.cap(dtype, c, series) for c in s.caps], label=label, **style)
                axes[1].plot(xs, [s.logit(dtype, c, series) for c in s.caps], label=label, **style)
                axes[2].plot(xs, [s.cap(dtype, c, series, "dq") for c in s.caps], label=label, **style)
                for ax, value in ((axes[3], "out"), (axes[4], "exact"), (axes[5], "dq")):
                    points = [(w or n, s.window(dtype, w, series, value)) for w in s.windows]
                    # A zero error (rows that see one key) has no place on a log axis: left out.
                    points = [(x, y) for x, y in points if y is not None and (y > 0 or value == "exact")]
                    ax.plot(*zip(*points, strict=True), label=label, **style)
    smallest = min(c for c in SOFTCAPS if c > 0)
    ticks = [c for c in SOFTCAPS if c >= 1 or c == smallest]
    for ax, title, ylabel in (
        (axes[0], "output, softcap sweep", "relative RMSE"),
        (axes[1], "capped logit (rows that see one key)", "RMS error (nats)"),
        (axes[2], "dq, softcap sweep", "relative RMSE"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([*ticks, off], [*(_cap(c) for c in ticks), "off"])
        ax.xaxis.set_minor_formatter(plots.plt.NullFormatter())
        ax.set_xlabel(f"softcap C (scores of RMS {SCORE_RMS:g})")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    for ax, title, ylabel in (
        (axes[3], "output, rows that see w keys", "relative RMSE"),
        (axes[4], "output bit-identical to the rounded truth", "share of elements"),
        (axes[5], "dq, rows that see w keys", "relative RMSE"),
    ):
        ax.set_xscale("log", base=2)
        if ax is not axes[4]:
            ax.set_yscale("log")
        ax.set_xlabel("keys seen w (the largest: no window)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0].legend(fontsize=5)
    plots.save(fig, figure)


def _tables(name, s) -> str:
    record = s.record
    forward, backward, window = [], [], []
    for dtype in DTYPES:
        for c in s.caps:
            k = s.sc[(dtype, c, KERNEL)]
            errors = [e(s.cap(dtype, c, series), 2) for series in SERIES]
            logits = [e(s.logit(dtype, c, series)) for series in SERIES]
            shape = [f"{k['slope']:.3f}", f"{100 * k['saturated']:.0f}%", f"{k['entropy']:.2f}"]
            forward.append([dtype, _cap(c), *shape, *errors, _ratio(s.cap_ratio(dtype, c)), *logits])
            grads = [e(s.cap(dtype, c, series, grad)) for grad in GRADS for series in SERIES]
            backward.append([dtype, _cap(c), *grads])
        for w in s.windows:
            dq = [
                e(x["dq"]) if x["dq"] is not None else f"0 (max error {x['dq_max']:g})"
                for x in (s.wn[(dtype, w, series)] for series in SERIES)
            ]
            window.append([
                dtype, w or f"{record['n']} (no window)", int(s.window(dtype, w, KERNEL, "rows")),
                *(e(s.window(dtype, w, series), 2) for series in SERIES), _ratio(s.window_ratio(dtype, w)),
                *(f"{100 * s.window(dtype, w, series, 'exact'):.1f}%" for series in (KERNEL, FLOOR)),
                *(e(s.window(dtype, w, series, "lse_max")) for series in (KERNEL, EAGER)), *dq,
            ])  # fmt: skip
    empty = record["empty"]
    checks = {
        "out_zero": "out exactly 0",
        "lse_neg_inf": "LSE -inf",
        "dq_zero": "dq exactly 0",
        "finite": "every output and gradient finite",
    }
    verdicts = ", ".join(
        f"{label} in {sum(r[key] for r in empty)}/{len(empty)}" for key, label in checks.items()
    )
    seeds = len({r["seed"] for r in record["softcap"]})
    three = ["kernel", "eager", "floor"]
    shape = ["mean slope", "saturated", "entropy"]
    forward_headers = ["dtype", "softcap", *shape, *(f"out: {x}" for x in three), "kernel / floor",
                       *(f"logit: {x}" for x in three)]  # fmt: skip
    window_headers = ["dtype", "keys seen", "rows", *(f"out: {x}" for x in three), "kernel / floor",
                      "bit-identical: kernel", "floor", "LSE max error: kernel", "eager",
                      *(f"dq: {x}" for x in three)]  # fmt: skip
    return (
        f"**{name}** ({record['meta']['device']}), H={record['heads']} N={record['n']} "
        f"D={record['head_dim']}, non-causal, {seeds} seed(s).\n\n"
        "(A) Softcap sweep. 'mean slope' is the mean of 1 - tanh^2(s / C) over all scores, 'saturated' the "
        f"share of scores whose slope is below {SATURATED_SLOPE:g}, 'entropy' the mean entropy (nats) of the "
        "float64 softmax rows; output errors are relative RMSE, 'logit' the RMS error of the capped logit "
        "(rows that see one key):\n\n"
        + table(forward_headers, forward)
        + "\n\nGradients in the same sweep (relative RMSE):\n\n"
        + table(["dtype", "softcap", *(f"{g}: {x}" for g in GRADS for x in three)], backward)
        + f"\n\n(B) Rows that see exactly w keys (window_size (w - 1, 0), Nq = Nk + {record['empty_rows']}), "
        "errors over those rows; 'bit-identical' is the share of output elements equal to the truth rounded "
        "to the input dtype:\n\n"
        + table(window_headers, window)
        + f"\n\nThe rows that see no key ({record['empty_rows']} per windowed call, {len(empty)} calls), "
        f"kernel: {verdicts}."
    )


def _softcap_findings(name, s) -> list[str]:
    caps, smallest = s.caps, min(c for c in s.caps if c > 0)
    kernel_logit = max(s.logit(dt, c, KERNEL) for dt in DTYPES for c in caps)
    floor_logit = max(s.logit(dt, c, FLOOR) for dt in DTYPES for c in caps)
    eager_logits = " and ".join(
        f"{e(min(s.logit(dt, c, EAGER) for c in caps))}–{e(max(s.logit(dt, c, EAGER) for c in caps))} in {dt}"
        for dt in DTYPES
    )
    kernel_ratios = " and ".join(
        f"{min(s.cap_ratio(dt, c) for c in caps):.2f}–{max(s.cap_ratio(dt, c) for c in caps):.2f}x the floor "
        f"in {dt}"
        for dt in DTYPES
    )
    eager_worst = max(s.cap_ratio(dt, c, EAGER) for dt in DTYPES for c in caps)
    findings = [
        f"{name}, scores of RMS {SCORE_RMS:g}, softcap from off to {smallest:g}: the kernel's capped logits "
        f"are within {e(kernel_logit)} (RMS, natural-log units) of the float64 truth at every cap, like the "
        f"fp32-inside floor's (up to {e(floor_logit)}), against eager attention's {eager_logits}; the "
        f"kernel's output error stays {kernel_ratios} (eager: up to {eager_worst:.1f}x)."
    ]

    def eager_points(dtype):
        worst = max(caps, key=lambda c: s.cap_ratio(dtype, c, EAGER))
        return ", ".join(
            f"{s.cap_ratio(dtype, c, EAGER):.1f}x the floor {_at(c)} (logit {e(s.logit(dtype, c, EAGER))})"
            for c in dict.fromkeys((0.0, worst, smallest))
        )

    findings.append(
        "Eager attention's output error follows the error of its capped logits (it rounds s, s / C, tanh and "
        "C tanh to the input dtype; the roundings after the tanh are not compressed): "
        + "; ".join(f"{dt}: {eager_points(dt)}" for dt in DTYPES)
        + "."
    )
    peak = max(caps, key=lambda c: s.cap_ratio("fp16", c))
    findings.append(
        "The kernel's excess over the floor is P's rounding before P.V (E5), whose size follows how the rows "
        f"spread their weight, which the cap changes: {s.cap_ratio('fp16', peak):.2f}x (fp16) and "
        f"{s.cap_ratio('bf16', peak):.2f}x (bf16) at C = {_cap(peak)} (mean row entropy "
        f"{s.cap('fp16', peak, value='entropy'):.2f} nats), {s.cap_ratio('fp16', 0.0):.2f}x and "
        f"{s.cap_ratio('bf16', 0.0):.2f}x without a cap (entropy {s.cap('fp16', 0.0, value='entropy'):.2f}: "
        "near one-hot rows, whose largest P is exactly 1)."
    )
    if {0.3, 0.32} <= set(caps):
        grid = "; ".join(
            f"{dt}: {s.cap_ratio(dt, 0.3):.2f}x the floor at C = 0.3, where e^(-0.6) lies "
            f"{_grid_offset(math.exp(-0.6), dt):.3f} of a spacing from the nearest {dt} number, and "
            f"{s.cap_ratio(dt, 0.32):.2f}x at C = 0.32 ({_grid_offset(math.exp(-0.64), dt):.3f})"
            for dt in DTYPES
        )
        findings.append(
            f"Deep in saturation ({100 * s.cap('bf16', 0.3, value='saturated'):.0f}% of the scores saturated "
            "at C = 0.3) most P of a row sit near 1 or near e^(-2C) (keys capped at +C and at -C), so one "
            "rounding repeats across the row instead of averaging out, and its size depends on the format's "
            f"grid: {grid}."
        )
    dqdk = "; ".join(
        f"{s.cap_ratio(dt, smallest, value='dq'):.2f}x and {s.cap_ratio(dt, smallest, value='dk'):.2f}x the "
        f"floor in {dt} (without a cap {s.cap_ratio(dt, 0.0, value='dq'):.2f}x and "
        f"{s.cap_ratio(dt, 0.0, value='dk'):.2f}x)"
        for dt in DTYPES
    )

    def over_dv(series):
        return ", ".join(
            f"{s.cap(dt, smallest, series, 'dq') / s.cap(dt, smallest, series, 'dv'):.1f}x and "
            f"{s.cap(dt, smallest, series, 'dk') / s.cap(dt, smallest, series, 'dv'):.1f}x ({dt})"
            for dt in DTYPES
        )

    findings.append(
        f"Backward: at C = {smallest:g} ({100 * s.cap('fp16', smallest, value='saturated'):.0f}% of the "
        f"scores saturated) the kernel's dq and dk are {dqdk}: its float32 slope 1 - t^2, which loses "
        "relative accuracy as t -> 1, costs nothing visible. Relative to their own dv, eager's dq and dk are "
        f"{over_dv(EAGER)} there (its backward rounds every step to the input dtype, autograd's tanh slope "
        f"1 - y^2 included, which takes the rounded y), the kernel's {over_dv(KERNEL)}."
    )
    return findings


def _window_findings(s) -> list[str]:
    record, few = s.record, min(w for w in s.windows if w > 1)
    exact = " and ".join(f"{100 * s.window(dt, 1, KERNEL, 'exact'):.0f}% ({dt})" for dt in DTYPES)
    dq_max = max(s.window(dt, 1, KERNEL, "dq_max") for dt in DTYPES)
    lse_max = max(s.window(dt, 1, KERNEL, "lse_max") for dt in DTYPES)

    def span(value):
        return " and ".join(
            f"{_ratio(s.window_ratio(dt, few, value))}x to {_ratio(s.window_ratio(dt, 0, value))}x ({dt})"
            for dt in DTYPES
        )

    shares = " to ".join(f"{100 * s.window('fp16', w, KERNEL, 'exact'):.0f}%" for w in (few, 0))
    findings = [
        f"Rows that see one key: the kernel's output is bit-identical to the truth in {exact} of the "
        f"elements, dq exactly 0 (max error {dq_max:g}), the LSE within {e(lse_max)}. From w = {few} keys "
        f"to all {record['n']}, the kernel's output error goes from {span('out')} the floor, its "
        f"bit-identical share from {shares} (fp16), and dq from {span('dq')} the floor."
    ]
    empty = record["empty"]
    broken = [r for r in empty if not all(r[k] for k in ("out_zero", "lse_neg_inf", "dq_zero", "finite"))]
    rows = sum(r["rows"] for r in empty)
    if broken:
        verdict = f"{len(broken)} of {len(empty)} calls break out = 0, LSE = -inf, dq = 0 or finiteness."
    else:
        verdict = "out exactly 0, LSE -inf and dq exactly 0 in every call, every output and gradient finite."
    findings.append(f"Rows that see no key ({rows} rows over {len(empty)} windowed calls, kernel): {verdict}")
    return findings


def section(cpu, gpu, figure):
    summaries = [(mode, _Summary(r)) for mode, r in (("cpu", cpu), ("gpu", gpu)) if r is not None]
    _plot(summaries, figure)
    names = {"cpu": "CPU (Triton interpreter)", "gpu": "GPU"}
    parts = [_tables(names[mode], s) for mode, s in summaries[::-1]]
    mode, main = summaries[-1]  # the GPU run when there is one
    findings = _softcap_findings(names[mode].split(" (")[0], main) + _window_findings(main)
    markdown = (
        __doc__.split("\n", 2)[2].strip()
        + "\n\n"
        + "\n\n".join(parts)
        + f"\n\n![softcap and windows](img/numerics/{figure.name})"
    )
    return markdown, findings
