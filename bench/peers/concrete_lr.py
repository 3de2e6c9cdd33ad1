"""Concrete-ML (Zama, TFHE) logistic regression on breast cancer: the peer side of `make bench-peers`.

Runs inside .bench-peers/venv (Concrete-ML pins torch, numpy and scikit-learn; never the main
venv). Trains Concrete-ML's LogisticRegression (default n_bits=8) on scikit-learn's breast-cancer
data, split and standardised exactly as our bench (train_test_split(test_size=0.25,
random_state=0), StandardScaler fitted on train), compiles it, and runs real FHE (not simulation)
through Concrete-ML's client/server deployment API, bytes across the boundary like ours:

* key generation: ``FHEModelClient.generate_private_and_evaluation_keys`` (+ serialising the
  evaluation keys the server needs);
* per-sample: ``quantize_encrypt_serialize`` / ``FHEModelServer.run`` (evaluation keys
  deserialised once, outside the timing) / ``deserialize_decrypt_dequantize``;
* throughput: the whole test split through that loop (the circuit is compiled for one sample,
  shape (1, 30): Concrete-ML has no batching across samples), and also ``model.predict(X,
  fhe="execute")``, Concrete-ML's own one-call path.

Writes ``--out`` (JSON metrics) and ``--data`` (npz: the split and the float model's weights),
which bench/peers/ours_lr.py then uses so that both engines see the same data and the same model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from concrete import fhe
from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer
from concrete.ml.sklearn import LogisticRegression
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="JSON metrics")
    ap.add_argument("--data", required=True, help="npz: split + float weights, for ours_lr.py")
    ap.add_argument("--n-bits", type=int, default=8, help="Concrete-ML quantisation (default 8)")
    args = ap.parse_args()

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)

    model = LogisticRegression(n_bits=args.n_bits)
    model.fit(x_tr, y_tr)
    float_lr = model.sklearn_model  # the float scikit-learn model Concrete-ML quantised
    t0 = time.perf_counter()
    circuit = model.compile(x_tr)
    compile_s = time.perf_counter() - t0
    np.savez(
        args.data,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        coef=float_lr.coef_,
        intercept=float_lr.intercept_,
    )

    with tempfile.TemporaryDirectory() as tmp:
        dev_dir, key_dir = Path(tmp) / "model", Path(tmp) / "keys"
        FHEModelDev(path_dir=str(dev_dir), model=model).save()
        client = FHEModelClient(path_dir=str(dev_dir), key_dir=str(key_dir))
        server = FHEModelServer(path_dir=str(dev_dir))
        server.load()
        t0 = time.perf_counter()
        client.generate_private_and_evaluation_keys(force=True)
        eval_keys = client.get_serialized_evaluation_keys()
        keygen_s = time.perf_counter() - t0
        assert isinstance(eval_keys, bytes)
        keys_obj = fhe.EvaluationKeys.deserialize(eval_keys)  # once, as a server would cache them

        enc_t, run_t, dec_t, req_b, resp_b, probs = [], [], [], [], [], []
        t_loop = time.perf_counter()
        for i in range(len(x_te)):
            t0 = time.perf_counter()
            req = client.quantize_encrypt_serialize(x_te[i : i + 1])
            t1 = time.perf_counter()
            resp = server.run(req, keys_obj)
            t2 = time.perf_counter()
            out = client.deserialize_decrypt_dequantize(resp)
            t3 = time.perf_counter()
            assert isinstance(req, bytes) and isinstance(resp, bytes)
            enc_t.append(t1 - t0)
            run_t.append(t2 - t1)
            dec_t.append(t3 - t2)
            req_b.append(len(req))
            resp_b.append(len(resp))
            probs.append(np.asarray(out).reshape(-1))
        loop_s = time.perf_counter() - t_loop

    fhe_labels = np.array([int(np.argmax(p)) if p.size > 1 else int(p[0] > 0.5) for p in probs])
    clear_labels = model.predict(x_te)  # Concrete-ML's quantised model in the clear
    float_labels = float_lr.predict(x_te)

    t0 = time.perf_counter()
    exec_labels = model.predict(x_te, fhe="execute")  # Concrete-ML's own path (keys already made)
    predict_execute_s = time.perf_counter() - t0

    n = len(x_te)
    lat = [a + b + c for a, b, c in zip(enc_t, run_t, dec_t, strict=True)]
    res = {
        "engine": "Concrete-ML",
        "versions": {
            "concrete-ml": version("concrete-ml"),
            "concrete-python": version("concrete-python"),
            "torch": version("torch"),
            "numpy": version("numpy"),
            "scikit-learn": version("scikit-learn"),
            "python": platform.python_version(),
        },
        "scheme": "TFHE (Concrete), 128-bit security, "
        f"n_bits={args.n_bits} quantised inputs and weights, p_error default",
        "n_test": n,
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "keyset_bytes": len(eval_keys),
        "latency_median_s": statistics.median(lat),
        "encrypt_median_s": statistics.median(enc_t),
        "compute_median_s": statistics.median(run_t),
        "decrypt_median_s": statistics.median(dec_t),
        "throughput_per_s": n / loop_s,
        "predict_execute_s": predict_execute_s,
        "predict_execute_per_s": n / predict_execute_s,
        "request_bytes_per_sample": statistics.median(req_b),
        "response_bytes_per_sample": statistics.median(resp_b),
        "acc_labels": float(np.mean(fhe_labels == y_te)),
        "agree_clear": float(np.mean(fhe_labels == clear_labels)),
        "clear_name": "Concrete-ML quantised model in the clear (fhe='disable')",
        "agree_float": float(np.mean(fhe_labels == float_labels)),
        "acc_clear_labels": float(np.mean(clear_labels == y_te)),
        "acc_float_labels": float(np.mean(float_labels == y_te)),
        "predict_execute_agree_loop": float(np.mean(exec_labels == fhe_labels)),
        "circuit": {"statistics_pbs": circuit.statistics.get("programmable_bootstrap_count")},
    }
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
