"""HE inference benchmark: our engine vs the same TenSEAL calls written by hand.

Prints a markdown section (``make bench`` collects it into docs/benchmarks.md). Slot-per-sample
layout, 4,096 samples, medians of ``--repeats`` runs. Ours includes circuit privacy (masking,
re-randomisation, flooding) and framing; the hand-written reference does neither.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tenseal as ts
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crypto.he import PublicContext, SecretContext, compile_model, evaluate  # noqa: E402

N_SAMPLES = 4096


def npz(layers):
    buf = io.BytesIO()
    arrays = {}
    for i, (w, b, a) in enumerate(layers):
        arrays.update({f"layer{i}.weight": w, f"layer{i}.bias": b, f"layer{i}.activation": np.array(a)})
    np.savez(buf, **arrays)
    return buf.getvalue()


def models():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    lr = LogisticRegression(max_iter=2000).fit(x, y)
    yield "LR breast cancer (30->1)", npz([(lr.coef_, lr.intercept_, "sigmoid")]), x
    xd, yd = load_digits(return_X_y=True)
    xd = xd / 16.0
    rng = np.random.default_rng(0)
    # weights do not change HE cost; a random 64-32-10 square MLP of the tested shape
    w1, w2 = rng.normal(0, 0.15, (32, 64)), rng.normal(0, 0.15, (10, 32))
    yield "MLP digits (64-32-10, x^2)", npz([(w1, np.zeros(32), "square"), (w2, np.zeros(10), "softmax")]), xd


def raw_tenseal(model, x, params=None):
    """The same computation with TenSEAL directly (no masking, re-randomisation, framing or
    scale-drift correction). ``params``: (N, bits, scale_bits), default the plan's."""
    plan = model.public_plan
    n, bits, scale_bits = params or (plan.poly_modulus_degree, plan.coeff_mod_bit_sizes, plan.scale_bits)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=list(bits))
    ctx.global_scale = 2.0**scale_bits
    pub = ts.context_from(ctx.serialize(save_secret_key=False, save_galois_keys=False))
    slots = n // 2
    te = tc = td = 0.0
    decs = []
    for start in range(0, len(x), slots):  # one chunk of `slots` samples per ciphertext
        xc = x[start : start + slots]
        t0 = time.perf_counter()
        enc = [ts.ckks_vector(ctx, xc[:, j].tolist()).serialize() for j in range(xc.shape[1])]
        t1 = time.perf_counter()
        h = [ts.ckks_vector_from(pub, b) for b in enc]
        coeffs = (0.0, 1.0)
        for i, layer in enumerate(model.layers):
            pw = {1: h, 2: [v.square() for v in h]} if len(coeffs) > 2 else {1: h}
            out = []
            for k in range(layer.weight.shape[1]):
                acc = None
                for q in range(1, len(coeffs)):
                    if coeffs[q] == 0:
                        continue
                    for j in range(layer.weight.shape[0]):
                        t = pw[q][j] * float(layer.weight[j, k] * coeffs[q])
                        acc = t if acc is None else acc + t
                out.append(acc + float(layer.bias[k]))
            h = out
            if i < len(model.layers) - 1:
                coeffs = layer.coeffs
        res = [v.serialize() for v in h]
        t2 = time.perf_counter()
        decs.append(np.stack([ts.ckks_vector_from(ctx, b).decrypt() for b in res], axis=1))
        t3 = time.perf_counter()
        te, tc, td = te + t1 - t0, tc + t2 - t1, td + t3 - t2
    err = float(np.abs(np.concatenate(decs) - model.predict_plain(x)).max())
    return (te, tc, td), err


def ours(model, x):
    plan = model.public_plan
    sk = SecretContext.generate(plan)
    keyset = sk.public_keyset_bytes()
    pub = PublicContext.from_bytes(keyset, plan=plan)
    t0 = time.perf_counter()
    req = sk.encrypt(x)
    t1 = time.perf_counter()
    resp = evaluate(model, pub, req)
    t2 = time.perf_counter()
    out = sk.decrypt(resp, postprocess=False)
    t3 = time.perf_counter()
    err = float(np.abs(out - model.predict_plain(x)).max())
    assert err < 2.0**-plan.precision_bits
    return (t1 - t0, t2 - t1, t3 - t2), len(keyset), len(req), len(resp), err


def single_latency(model, x):
    sk = SecretContext.generate(model.public_plan, layout="single")
    keyset = sk.public_keyset_bytes()
    pub = PublicContext.from_bytes(keyset, plan=model.public_plan)
    t0 = time.perf_counter()
    out = sk.decrypt(evaluate(model, pub, sk.encrypt(x[:1], layout="single")), postprocess=False)
    t1 = time.perf_counter()
    assert np.abs(out - model.predict_plain(x[:1])).max() < 2.0**-model.public_plan.precision_bits
    return t1 - t0, len(keyset)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("## HE inference (CKKS, TenSEAL)\n")
    print(
        f"{N_SAMPLES} samples, slot-per-sample layout, median of {args.repeats} runs; "
        "ours includes masking, re-randomisation, flooding and framing.\n"
    )
    print(
        "| model | params | engine | encrypt/s | compute/s | decrypt/s | end-to-end/s | time ratio ours/raw "
        "| max logit error |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    extra = []
    for name, data, xs in models():
        x = xs[np.arange(N_SAMPLES) % len(xs)]
        t0 = time.perf_counter()
        model = compile_model(data, "npz", calibration=xs)
        compile_s = time.perf_counter() - t0
        p = model.public_plan
        params = f"N={p.poly_modulus_degree} {list(p.coeff_mod_bit_sizes)} 2^{p.scale_bits}"
        o = [ours(model, x) for _ in range(args.repeats)]
        r = [raw_tenseal(model, x) for _ in range(args.repeats)]
        om = [statistics.median(t[0][i] for t in o) for i in range(3)]
        rm = [statistics.median(t[0][i] for t in r) for i in range(3)]
        rows = [
            (f"ours (promise 2^-{p.precision_bits}, incl. flooding)", params, om, o[0][4]),
            ("raw TenSEAL", params, rm, r[0][1]),
        ]
        if p.depth == 3:  # the reference parameters, raw (no drift correction)
            ref = (8192, (50, 30, 30, 30, 50), 30)
            rr = [raw_tenseal(model, x, ref) for _ in range(args.repeats)]
            rows.append(
                (
                    "raw TenSEAL, issue's params",
                    "N=8192 [50, 30, 30, 30, 50] 2^30",
                    [statistics.median(t[0][i] for t in rr) for i in range(3)],
                    rr[0][1],
                )
            )
        for label, prm, m, err in rows:
            ratio = f"{sum(rm) and sum(om) / sum(rm):.2f}x" if label.startswith("ours") else ""
            print(
                f"| {name} | {prm} | {label} | "
                + " | ".join(f"{N_SAMPLES / t:,.0f}" for t in m)
                + f" | {N_SAMPLES / sum(m):,.0f} | {ratio} | {err:.1e} |"
            )
        s = model.search.chosen
        extra_search = (
            f"compile {compile_s:.1f} s, measured CKKS error {s.max_abs_error:.1e} on {model.search.samples} samples"
        )
        t0 = time.perf_counter()
        for _ in range(10):
            model.predict_plain(x)
        plain = 10 * N_SAMPLES / (time.perf_counter() - t0)
        lat, ks_single = single_latency(model, xs)
        _, ks, req, resp, _ = o[0]
        extra.append(
            f"| {name} | {plain:,.0f} | {lat * 1000:,.0f} ms | {ks / 1e6:.1f} MB | {ks_single / 1e6:.1f} MB "
            f"| {req / N_SAMPLES:,.0f} | {resp / N_SAMPLES:,.0f} | {extra_search} |"
        )
    print(
        "\n| model | plaintext numpy samples/s | single-sample latency (single layout) | key set (batch) | key set (single) | request bytes/sample | response bytes/sample | parameter search |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(extra))
    print("\n(ratio column: our end-to-end time / raw TenSEAL end-to-end time; target <= 1.15x.)")


if __name__ == "__main__":
    main()
