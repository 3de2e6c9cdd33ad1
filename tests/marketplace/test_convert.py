"""`som convert` and `SomClient.upload_sklearn`: framework models become declarative artifacts.

Every conversion is checked three ways: against the estimator itself, against skl2onnx's own
graph of the same estimator run by ONNX's reference evaluator (an independent reading of the
fitted parameters), and by the server, which validates the upload.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from typer.testing import CliRunner

from marketplace.cli import app as cli_app
from marketplace.sdk.convert import (
    UnsupportedModel,
    artifact_outputs,
    check_artifact,
    from_estimator,
    from_torch,
    probe_rows,
)


def _fit(est, X, y):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def _cases():  # type: ignore[no-untyped-def]
    Xb, yb = load_breast_cancer(return_X_y=True)
    Xd, yd = load_digits(return_X_y=True)
    Xr, yr = load_diabetes(return_X_y=True)
    return {
        "pipeline-logreg-binary": (make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), Xb, yb),
        "logreg-multinomial": (LogisticRegression(max_iter=3000), Xd / 16.0, yd),
        "linear-regression": (LinearRegression(), Xr, yr),
        "pipeline-ridge": (make_pipeline(StandardScaler(), Ridge(alpha=1.0)), Xr, yr),
        "mlp-classifier-multiclass": (
            MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=0),
            Xd / 16.0,
            yd,
        ),
        "pipeline-mlp-binary-tanh": (
            make_pipeline(
                StandardScaler(),
                MLPClassifier(hidden_layer_sizes=(8, 4), activation="tanh", max_iter=60, random_state=0),
            ),
            Xb,
            yb,
        ),
        "mlp-regressor-logistic": (
            MLPRegressor(hidden_layer_sizes=(8,), activation="logistic", max_iter=60, random_state=0),
            Xr,
            yr,
        ),
    }


CASES = _cases()


def _skl2onnx_outputs(est, X: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The same estimator through skl2onnx's converter and ONNX's reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    from skl2onnx import to_onnx

    last = est.steps[-1][1] if hasattr(est, "steps") else est
    options = {id(last): {"zipmap": False}} if hasattr(last, "predict_proba") else None
    model = to_onnx(est, X[:1].astype(np.float32), options=options, target_opset=17)
    outs = ReferenceEvaluator(model).run(None, {"X": X.astype(np.float32)})
    if hasattr(last, "predict_proba"):
        p = np.asarray(outs[1], dtype=np.float64)
        return p[:, 1:] if p.shape[1] == 2 else p
    return np.asarray(outs[0], dtype=np.float64).reshape(len(X), -1)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fmt", ["npz", "onnx"])
def test_conversion_matches_the_estimator_and_skl2onnx(name: str, fmt: str) -> None:
    est, X, y = CASES[name]
    est = _fit(est, X, y)
    art = check_artifact(from_estimator(est, format=fmt), est, X[:200], tolerance=1e-3)
    assert art.input_dim == X.shape[1] and art.max_abs_error is not None
    ours = artifact_outputs(art, X[:200])
    ref = _skl2onnx_outputs(est, X[:200])
    scale = max(1.0, float(np.max(np.abs(ref))))  # regression targets are in the hundreds
    assert np.max(np.abs(ours - ref)) <= 1e-4 * scale


def test_a_wrong_conversion_is_caught_by_the_check() -> None:
    est, X, y = CASES["pipeline-logreg-binary"]
    est = _fit(est, X, y)
    good = from_estimator(est)
    other = _fit(make_pipeline(StandardScaler(), LogisticRegression(C=1e-3, max_iter=2000)), X, y)
    with pytest.raises(UnsupportedModel, match="differs from the estimator"):
        check_artifact(good, other, X[:50])


def test_unsupported_estimators_are_named() -> None:
    X, y = load_breast_cancer(return_X_y=True)
    with pytest.raises(UnsupportedModel, match="DecisionTreeClassifier is not supported"):
        from_estimator(DecisionTreeClassifier().fit(X, y))
    with pytest.raises(UnsupportedModel, match="not fitted"):
        from_estimator(LogisticRegression())
    bad = _fit(make_pipeline(StandardScaler(), StandardScaler(), LogisticRegression()), X, y)
    with pytest.raises(UnsupportedModel, match="Pipeline of StandardScaler, StandardScaler"):
        from_estimator(bad)


def test_torch_sequential() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), torch.nn.Softmax(dim=-1))
    x = np.random.default_rng(0).standard_normal((40, 30))
    with torch.no_grad():
        want = net(torch.tensor(x, dtype=torch.float32)).numpy()
    for fmt in ("npz", "onnx"):
        art = from_torch(net, format=fmt)  # type: ignore[arg-type]
        assert (art.input_dim, art.output_dim) == (30, 3)
        assert np.max(np.abs(artifact_outputs(art, x) - want)) < 1e-5
    with pytest.raises(UnsupportedModel, match="Conv1d"):
        from_torch(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 3)))


def test_som_convert_cli_then_upload_to_a_real_server(live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    world, url = live
    est, X, y = CASES["pipeline-logreg-binary"]
    est = _fit(est, X, y)
    path = tmp_path / "model.joblib"
    joblib.dump(est, path)
    offering = world.provider.create_offering(
        name="converted", description="from scikit-learn", task="binary-classification"
    )
    env = {"SOM_URL": url, "SOM_API_KEY": world.keys["provider"]}

    r = CliRunner().invoke(cli_app, ["convert", str(path)], env=env)
    assert r.exit_code == 0, r.output
    assert "next: som offering upload" in r.output
    npz = tmp_path / "model.npz"
    with np.load(io.BytesIO(npz.read_bytes()), allow_pickle=False) as z:
        assert sorted(z.files) == ["layer0.activation", "layer0.bias", "layer0.weight"]

    r = CliRunner().invoke(
        cli_app, ["--json", "convert", str(path), "--format", "onnx", "--upload", offering["id"]], env=env
    )
    assert r.exit_code == 0, r.output
    versions = world.provider.list_versions(offering["id"])
    assert [v["format"] for v in versions] == ["onnx"] and versions[0]["input_shape"] == [30]

    v = world.provider.upload_sklearn(offering["id"], est)
    assert v["format"] == "npz" and v["input_shape"] == [30]

    # the server still refuses the pickle itself
    r = CliRunner().invoke(cli_app, ["offering", "upload", offering["id"], str(path), "--format", "npz"], env=env)
    assert r.exit_code != 0


def test_cli_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    X, y = load_breast_cancer(return_X_y=True)
    tree = tmp_path / "tree.joblib"
    joblib.dump(DecisionTreeClassifier().fit(X, y), tree)
    r = CliRunner().invoke(cli_app, ["convert", str(tree)])
    assert r.exit_code == 2 and "not supported" in r.output
    junk = tmp_path / "junk.joblib"
    junk.write_bytes(b"not a pickle")
    r = CliRunner().invoke(cli_app, ["convert", str(junk)])
    assert r.exit_code == 2 and "could not read it as a model" in r.output
    r = CliRunner().invoke(cli_app, ["convert", str(tree), "--format", "pmml"])
    assert r.exit_code == 2


def test_probe_rows_follow_the_scaler() -> None:
    est, X, y = CASES["pipeline-logreg-binary"]
    est = _fit(est, X, y)
    rows = probe_rows(est, X.shape[1], n=2000)
    assert np.allclose(rows.mean(0), X.mean(0), atol=0.2 * X.std(0).max())
