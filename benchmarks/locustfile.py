"""Locust user sessions against the demo shop through the balancer; a lost cart is a failure."""

# Run headless for a bounded time against a running balancer (e.g. `balancer demo`):
#
#   locust -f benchmarks/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8080
#
# (`pip install .[bench]` brings locust.) Each simulated user logs in, browses the products,
# looks at one, adds it to the cart and views the cart, with cookies kept like a browser. The
# cart lives in the memory of the one backend that served the adds, so when the balancer sends
# the same session to another backend the cart comes back without the items: that request is
# marked failed ("cart lost items"). With `sticky:` on the pool the failure count stays at zero
# (until a backend is taken down); with plain round_robin over several backends it does not.
# Knobs: DEMO_WAIT_MIN / DEMO_WAIT_MAX (seconds between a user's requests, default 0.2 / 1.0).

from __future__ import annotations

import itertools
import os
import random
from typing import Any

from locust import HttpUser, between, task

_user_ids = itertools.count(1)


class ShopUser(HttpUser):
    wait_time = between(
        float(os.environ.get("DEMO_WAIT_MIN", "0.2")), float(os.environ.get("DEMO_WAIT_MAX", "1.0"))
    )

    def on_start(self) -> None:
        self.product_ids: list[int] = []
        self.new_visit()

    # -- a visit: log in with fresh cookies and an empty cart ------------------------------------

    def new_visit(self) -> None:
        # A new visitor (or the same one after closing the browser): no cookies, empty cart.
        self.client.cookies.clear()
        self.expected_cart: dict[int, int] = {}
        self.user = f"user-{next(_user_ids)}"
        with self.client.post("/login", json={"user": self.user}, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"login answered {resp.status_code}")
            elif _json(resp).get("user") != self.user:
                resp.failure("login did not echo the user")
            else:
                resp.success()
        if not self.product_ids:
            self.browse()

    # -- what users do, weighted like a shop's traffic -------------------------------------------

    @task(5)
    def browse(self) -> None:
        with self.client.get("/products", catch_response=True) as resp:
            products = _json(resp).get("products") if resp.status_code == 200 else None
            if not products:
                resp.failure(f"no product list (status {resp.status_code})")
                return
            self.product_ids = [p["id"] for p in products]
            resp.success()

    @task(4)
    def view_product(self) -> None:
        if not self.product_ids:
            return
        pid = random.choice(self.product_ids)
        with self.client.get(f"/products/{pid}", name="/products/[id]", catch_response=True) as r:
            if r.status_code != 200 or _json(r).get("product", {}).get("id") != pid:
                r.failure(f"product {pid} not shown (status {r.status_code})")
            else:
                r.success()

    @task(2)
    def add_to_cart(self) -> None:
        if not self.product_ids:
            return
        pid = random.choice(self.product_ids)
        with self.client.post("/cart", json={"product_id": pid}, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"add to cart answered {resp.status_code}")
                return
            self.expected_cart[pid] = self.expected_cart.get(pid, 0) + 1
            # The answer is the cart after the add, as kept by whichever backend took it.
            self._check_cart(resp)

    @task(2)
    def view_cart(self) -> None:
        with self.client.get("/cart", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"cart answered {resp.status_code}")
                return
            self._check_cart(resp)

    @task(1)
    def leave_and_come_back(self) -> None:
        self.new_visit()

    # -- the invariant ---------------------------------------------------------------------------

    def _check_cart(self, resp: Any) -> None:
        body = _json(resp)
        got = {item["product_id"]: item["quantity"] for item in body.get("items", [])}
        if got != self.expected_cart:
            # One fixed message, so locust counts these under one row of its failure table.
            resp.failure("cart lost items (session not kept on one backend)")
            # Carry on from what the user now sees, as a shopper would, so each failure counts
            # one move to another backend rather than every request after the first.
            self.expected_cart = got
        else:
            resp.success()


def _json(resp: Any) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
