"""Our engine (crypto.he, CKKS/TenSEAL) on the data and model Concrete-ML used: our side of `make bench-peers`.

Runs in the main venv. Reads the npz written by bench/peers/concrete_lr.py (the same split, the
same standardisation, and the float weights of the scikit-learn model Concrete-ML quantised), so
both engines evaluate the same logistic regression on the same test samples. Compiles it with
``crypto.he.compile_model`` (calibration: the training split) and measures, with the public API
only (bytes across the boundary, circuit privacy on):

* key generation: ``SecretContext.generate`` + ``public_keyset_bytes`` (layout "single" for the
  latency rows: it carries the rotation keys; layout "batch" for throughput: no Galois keys);
* per-sample latency: one sample per request, layout "single", encrypt / evaluate / decrypt,
  median over the test split;
* throughput: the whole test split in one batch request (slot-per-sample), median of
  ``--repeats``; and the same at a full ciphertext (N/2 samples, the test split tiled).

Writes ``--out`` (JSON metrics). If ``--data`` does not exist (Concrete-ML could not run), makes
the same split itself and fits scikit-learn's LogisticRegression (Concrete-ML's float model is
that same estimator with default parameters).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np


def _src_root() -> str:
    """Where ``crypto`` is imported from: ``--src DIR`` (e.g. an export of HEAD) or this checkout."""
    if "--src" in sys.argv:
        return str(Path(sys.argv[sys.argv.index("--src") + 1]).resolve())
    return str(Path(__file__).resolve().parents[2])


sys.path.insert(0, _src_root())

from crypto.he import PublicContext, SecretContext, compile_model, evaluate  # noqa: E402


def artifact(coef: np.ndarray, intercept: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": coef, "layer0.bias": intercept, "layer0.activation": np.array("sigmoid")})
    return buf.getvalue()


def make_data(path: str) -> None:
    """The split concrete_lr.py makes, with a float LogisticRegression fitted here (fallback)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    lr = LogisticRegression().fit(x_tr, y_tr)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, coef=lr.coef_, intercept=lr.intercept_)


def batch_run(model, sk: SecretContext, pub: PublicContext, x: np.ndarray) -> tuple[float, np.ndarray, int, int]:
    t0 = time.perf_counter()
    req = sk.encrypt(x)
    resp = evaluate(model, pub, req)
    out = sk.decrypt(resp, postprocess=False)
    return time.perf_counter() - t0, out, len(req), len(resp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="npz from concrete_lr.py")
    ap.add_argument("--out", required=True, help="JSON metrics")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--src", default=None, help="import crypto/ from this directory (default: this checkout)")
    args = ap.parse_args()

    if not Path(args.data).exists():
        make_data(args.data)  # Concrete-ML did not run: same split, our own scikit-learn fit
    with np.load(args.data, allow_pickle=False) as f:
        d = {k: f[k] for k in f.files}
    x_tr, x_te, y_te = d["x_train"], d["x_test"], d["y_test"]
    n = len(x_te)

    t0 = time.perf_counter()
    model = compile_model(artifact(d["coef"], d["intercept"]), "npz", calibration=x_tr)
    compile_s = time.perf_counter() - t0
    plan = model.public_plan

    # latency: layout "single", one sample per request
    t0 = time.perf_counter()
    sk1 = SecretContext.generate(plan, layout="single")
    keys1 = sk1.public_keyset_bytes()
    keygen_single_s = time.perf_counter() - t0
    pub1 = PublicContext.from_bytes(keys1, plan=plan)
    enc_t, run_t, dec_t, logits, req1, resp1 = [], [], [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        req = sk1.encrypt(x_te[i : i + 1], layout="single")
        t1 = time.perf_counter()
        resp = evaluate(model, pub1, req)
        t2 = time.perf_counter()
        out = sk1.decrypt(resp, postprocess=False)
        t3 = time.perf_counter()
        enc_t.append(t1 - t0)
        run_t.append(t2 - t1)
        dec_t.append(t3 - t2)
        req1.append(len(req))
        resp1.append(len(resp))
        logits.append(float(out[0, 0]))
    single_logits = np.array(logits)
    # diagnostic only: the same single-layout evaluation without re-randomisation and flooding
    req = sk1.encrypt(x_te[:1], layout="single")
    logging.disable(logging.WARNING)  # evaluate() warns on every unsafe call
    bare = []
    for _ in range(min(n, 30)):
        t0 = time.perf_counter()
        evaluate(model, pub1, req, unsafe_no_circuit_privacy=True)
        bare.append(time.perf_counter() - t0)
    logging.disable(logging.NOTSET)

    # throughput: layout "batch", the test split in one request; then a full ciphertext
    t0 = time.perf_counter()
    skb = SecretContext.generate(plan)
    keysb = skb.public_keyset_bytes()
    keygen_batch_s = time.perf_counter() - t0
    pubb = PublicContext.from_bytes(keysb, plan=plan)
    runs = [batch_run(model, skb, pubb, x_te) for _ in range(args.repeats)]
    batch_s = statistics.median(r[0] for r in runs)
    batch_logits = runs[0][1][:, 0]
    x_full = x_te[np.arange(plan.slots) % n]
    full = [batch_run(model, skb, pubb, x_full) for _ in range(args.repeats)]
    full_s = statistics.median(r[0] for r in full)
    one = [batch_run(model, skb, pubb, x_te[i : i + 1])[0] for i in range(min(n, 30))]

    w, b = d["coef"].reshape(-1), float(d["intercept"].reshape(-1)[0])
    float_logits = x_te @ w + b
    float_labels = (float_logits > 0).astype(int)
    he_labels = (batch_logits > 0).astype(int)
    single_labels = (single_logits > 0).astype(int)
    lat = [a + b_ + c for a, b_, c in zip(enc_t, run_t, dec_t, strict=True)]
    res = {
        "engine": "ours (crypto.he)",
        "crypto_from": sys.modules["crypto"].__file__,
        "versions": {
            "tenseal": version("tenseal"),
            "numpy": version("numpy"),
            "scikit-learn": version("scikit-learn"),
            "python": platform.python_version(),
        },
        "scheme": f"CKKS (TenSEAL/SEAL), 128-bit security, N={plan.poly_modulus_degree} "
        f"{list(plan.coeff_mod_bit_sizes)} scale 2^{plan.scale_bits}, promised 2^-{plan.precision_bits} "
        f"on logits, flooding 2^-{plan.noise_bits}",
        "n_test": n,
        "compile_s": compile_s,
        "keygen_s": keygen_single_s,
        "keygen_batch_s": keygen_batch_s,
        "keyset_bytes": len(keys1),
        "keyset_batch_bytes": len(keysb),
        "latency_median_s": statistics.median(lat),
        "encrypt_median_s": statistics.median(enc_t),
        "compute_median_s": statistics.median(run_t),
        "decrypt_median_s": statistics.median(dec_t),
        "compute_no_privacy_median_s": statistics.median(bare),
        "latency_batch_layout_one_sample_s": statistics.median(one),
        "throughput_per_s": n / batch_s,
        "throughput_full_per_s": len(x_full) / full_s,
        "full_batch_samples": len(x_full),
        "request_bytes_per_sample": statistics.median(req1),
        "response_bytes_per_sample": statistics.median(resp1),
        "batch_request_bytes_per_sample": runs[0][2] / n,
        "batch_response_bytes_per_sample": runs[0][3] / n,
        "acc_labels": float(np.mean(he_labels == y_te)),
        "acc_labels_single": float(np.mean(single_labels == y_te)),
        "agree_clear": float(np.mean(he_labels == float_labels)),
        "agree_clear_single": float(np.mean(single_labels == float_labels)),
        "clear_name": "the same float weights in the clear (numpy)",
        "agree_float": float(np.mean(he_labels == float_labels)),
        "acc_clear_labels": float(np.mean(float_labels == y_te)),
        "acc_float_labels": float(np.mean(float_labels == y_te)),
        "max_logit_error": float(
            max(np.abs(batch_logits - float_logits).max(), np.abs(single_logits - float_logits).max())
        ),
    }
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
