"""Shared setup of the sharing tests (no tests here): a world served by uvicorn on loopback, whose
clients talk real HTTP, a shared LR offering, teams and keys, the `som` CLI against it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from marketplace.sdk import SomAPIError, SomClient
from tests.conftest import World, serve_in_thread
from tests.marketplace.test_he_service_support import lr_breast_cancer


@dataclass
class Served:
    world: World
    url: str

    def client(self, key: str) -> SomClient:
        return SomClient(self.url, key)

    def key(self, name: str) -> SomClient:
        return self.client(self.world.keys[name])

    def child(self, parent: str, roles: list[str], name: str) -> tuple[str, SomClient]:
        """A key the org's root key ``parent`` creates (not a root key itself): (key id, client)."""
        w = self.world
        k = self.key(parent).create_key(w.orgs[parent], roles, name=name)
        return str(k["id"]), self.client(k["key"])

    def som(self, key: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_")}
        env.update({"SOM_URL": self.url, "SOM_API_KEY": key})
        r = subprocess.run(
            [sys.executable, "-m", "marketplace.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )
        if check and r.returncode != 0:
            raise AssertionError(f"som {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r


@contextmanager
def served(world: World) -> Iterator[Served]:
    with serve_in_thread(world.app) as url:
        yield Served(world, url)


def status_of(fn: Any, *a: Any, **kw: Any) -> int:
    try:
        fn(*a, **kw)
    except SomAPIError as e:
        return int(e.status)
    return 200


def err_of(fn: Any, *a: Any, **kw: Any) -> SomAPIError:
    try:
        fn(*a, **kw)
    except SomAPIError as e:
        return e
    raise AssertionError("expected an API error")


def lr_npz(sign: float = 1.0) -> bytes:
    """The breast-cancer LR (``sign=-1``: the same model with its logit negated)."""
    d = lr_breast_cancer()
    with np.load(io.BytesIO(d.npz)) as z:
        w, b = z["layer0.weight"] * sign, z["layer0.bias"] * sign
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": w, "layer0.bias": b, "layer0.activation": np.array("sigmoid")})
    return buf.getvalue()


def lr_offering(c: SomClient, *, visibility: str = "public", publish: bool = True) -> str:
    off = c.create_offering(
        name="cancer-lr", task="binary-classification", hosting="marketplace", visibility=visibility
    )
    c.upload_version(off["id"], lr_npz(), format="npz", input_shape=[30])
    if publish:
        c.publish(off["id"])
    return str(off["id"])


def search_ids(c: SomClient) -> set[str]:
    return {o["id"] for o in c.search_offerings()}


def cli_json(r: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(r.stdout)


def mlp_npz(seed: int = 1) -> tuple[bytes, np.ndarray]:
    """A 4-4-1 MLP whose sigmoid hidden layer sees large pre-activations: its HE polynomial
    approximation agrees with the plaintext model on ~93% of its calibration data. (npz, calibration)"""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 6, (4, 4))
    w2 = rng.normal(0, 1, (1, 4))
    buf = io.BytesIO()
    np.savez(
        buf,
        **{
            "layer0.weight": w1,
            "layer0.bias": np.zeros(4),
            "layer0.activation": np.array("sigmoid"),
            "layer1.weight": w2,
            "layer1.bias": np.array([-0.5 * w2.sum()]),
            "layer1.activation": np.array("none"),
        },
    )
    return buf.getvalue(), rng.normal(0, 1, (256, 4))
