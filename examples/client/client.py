#!/usr/bin/env python3
"""Call a structsim SimilarityService from another pod: one pair, a batch, and a ranking.

Standard library only, so it runs in any Python 3.9+ container without installing anything:

    kubectl run simclient --rm -i --restart=Never --image=python:3.11-slim -- \
        python - --url http://similarity.default.svc < examples/client/client.py

The URL is http://<SimilarityService name>.<namespace>.svc (status.endpoint of the resource);
`--url` defaults to $STRUCTSIM_URL. Busy or starting services answer 429/503 with Retry-After:
the client waits as told and retries a few times, as production callers should.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

RETRY_STATUSES = {429, 503}  # overloaded, or not ready / draining: both say when to come back


class ServiceError(RuntimeError):
    """An error answer from the service: its status and `{"error": {"code", "message"}}` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code


class SimilarityClient:
    """A minimal client of the service's JSON API (routes: docs/kubernetes.md; the service also
    serves its own OpenAPI document)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0, retries: int = 3, max_wait_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_wait_s = max_wait_s  # never sleep longer than this, whatever Retry-After says

    def similarity(self, sentence1: str, sentence2: str) -> dict[str, Any]:
        """P(similar) of one pair: `{"similarity", "model", "precision"}`."""
        return self._call("POST", "/v1/similarity", {"sentence1": sentence1, "sentence2": sentence2})

    def batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        """P(similar) of each pair, in order."""
        body = {"pairs": [{"sentence1": a, "sentence2": b} for a, b in pairs]}
        return list(self._call("POST", "/v1/similarity/batch", body)["similarities"])

    def rank(self, source: str, targets: list[str], top_k: int | None = None) -> list[dict[str, Any]]:
        """The targets sorted by similarity to `source`, best first: `{"index", "sentence", "similarity"}`
        each, `index` being the target's position in `targets`."""
        body: dict[str, Any] = {"source": source, "targets": targets}
        if top_k is not None:
            body["top_k"] = top_k
        return list(self._call("POST", "/v1/rank", body)["results"])

    def info(self) -> dict[str, Any]:
        """Model, precision, device and the tuned config the pod that answered is running."""
        return self._call("GET", "/v1/info", None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base_url + path, data=data, method=method)
            if data is not None:
                request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return dict(json.load(response))
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUSES and attempt < self.retries:
                    time.sleep(min(_retry_after(exc.headers.get("Retry-After")), self.max_wait_s))
                    continue
                raise _service_error(exc) from None
        raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (the service sends delta-seconds); 1 s if absent or odd."""
    try:
        return max(0.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0


def _service_error(exc: urllib.error.HTTPError) -> ServiceError:
    try:
        error = json.load(exc)["error"]
        return ServiceError(exc.code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ServiceError(exc.code, "http_error", exc.reason or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("STRUCTSIM_URL", "http://similarity.default.svc"),
                        help="the service, http://<name>.<namespace>.svc (default: $STRUCTSIM_URL)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    args = parser.parse_args(argv)
    client = SimilarityClient(args.url, timeout_s=args.timeout)
    try:
        print("info:", json.dumps(client.info(), ensure_ascii=False))
        one = client.similarity("怎么修改登录密码", "如何更改账户密码")
        print(f"one pair: similarity={one['similarity']:.4f} ({one['precision']})")
        scores = client.batch([
            ("花呗可以提前还款吗", "花呗能不能提前还"),
            ("快递几天能到", "退货运费谁承担"),
        ])
        print("batch:", ", ".join(f"{s:.4f}" for s in scores))
        ranked = client.rank("我的订单什么时候发货", ["订单多久发货", "怎么申请退款", "发货时间是多久"], top_k=2)
        for result in ranked:
            print(f"rank: {result['similarity']:.4f} {result['sentence']}")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"cannot reach {args.url}: {exc.reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
