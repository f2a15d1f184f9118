"""The `listeners:` section: binds, modes, routes, TLS certificates and redirects."""

from __future__ import annotations

import ssl
import string
import urllib.parse
from typing import Any

import yaml

from balancer.config import values as v
from balancer.config.reader import ABSENT, Reader, Section
from balancer.config.schema import (
    Address,
    AdminConfig,
    ListenerConfig,
    Route,
    TlsCertificate,
    TlsConfig,
)

LISTENER_KEYS = (
    "name",
    "bind",
    "mode",
    "routes",
    "pool",
    "tls",
    "redirect_https",
    "http2",
    "proxy_protocol",
)
_ROUTE_KEYS = ("host", "path_prefix", "pool")
_TLS_KEYS = ("certificates", "min_version")
_CERT_KEYS = ("cert", "key")


def read_listeners(
    r: Reader, top: Section, pools: set[str] | None, admin: AdminConfig | None
) -> tuple[list[ListenerConfig], bool]:
    """The listeners that are right, and whether every listener is."""
    if not top.has("listeners"):
        r.problem(
            "listeners",
            "at least one listener is required",
            top.line("listeners") if "listeners" in top.entries else None,
        )
        return [], False
    nodes = r.sequence(top.value_node("listeners"), "listeners", "listeners")
    if nodes is None:
        return [], False
    if not nodes:
        r.problem("listeners", "at least one listener is required", top.value_node("listeners"))
        return [], False
    result: list[ListenerConfig] = []
    names: dict[str, str] = {}
    binds: list[tuple[Address, str]] = [] if admin is None else [(admin.bind, "admin.bind")]
    for i, node in enumerate(nodes):
        listener, s = _listener(r, node, f"listeners[{i}]", pools)
        if listener is not None:
            result.append(listener)
        name = s.values.get("name")
        if name is not None:
            if name in names:
                r.problem(
                    s.at("name"),
                    f"duplicate listener name '{name}' (also {names[name]})",
                    s.value_node("name"),
                )
            names.setdefault(name, s.loc)
        bind = s.values.get("bind")
        if bind is not None:
            clash = next((owner for taken, owner in binds if _overlaps(taken, bind)), None)
            if clash is not None:
                r.problem(s.at("bind"), f"{bind} is already bound by {clash}", s.value_node("bind"))
            binds.append((bind, s.at("bind")))
    return result, len(result) == len(nodes)


def _listener(
    r: Reader, node: yaml.Node, loc: str, pools: set[str] | None
) -> tuple[ListenerConfig | None, Section]:
    mark = r.checkpoint()
    s = Section(r, node, loc, LISTENER_KEYS)
    if not s.ok:
        return None, s
    name = s.get("name", v.name, required=True)
    bind = s.get("bind", v.bind_address, required=True)
    mode = s.get("mode", v.choice("http", "tcp"))
    # the PROXY header comes before any byte of either mode, so both may take it
    kwargs: dict[str, Any] = s.fields(proxy_protocol=v.boolean)
    if mode == "tcp":
        for key, why in (
            ("routes", "a tcp listener forwards whole connections to its pool; it has no routes"),
            ("tls", "a tcp listener does not terminate TLS (the backends do); remove tls"),
            ("redirect_https", "redirect_https is for http listeners"),
            (
                "http2",
                "http2 is for http listeners; a tcp listener forwards the bytes of any"
                " protocol as they come",
            ),
        ):
            if key in s.entries:
                r.problem(s.at(key), why, s.line(key))
        pool = s.get("pool", v.string, required="a tcp listener needs 'pool'")
        if pool is not ABSENT:
            check_pool_ref(r, pool, s.at("pool"), s.value_node("pool"), pools)
            kwargs["pool"] = pool
    # with a wrong mode (reported already) neither set of rules applies
    elif mode == "http" or not s.has("mode"):
        if "pool" in s.entries:
            r.problem(
                s.at("pool"),
                "'pool' is for tcp listeners; an http listener uses routes: [{pool: NAME}]",
                s.line("pool"),
            )
        has_routes, has_redirect = "routes" in s.entries, "redirect_https" in s.entries
        if has_routes and has_redirect:
            r.problem(
                s.at("redirect_https"),
                "give either routes or redirect_https, not both: a redirecting listener"
                " forwards nothing",
                s.line("redirect_https"),
            )
        elif not has_routes and not has_redirect:
            r.problem(loc, "an http listener needs routes (or redirect_https)", node)
        if has_routes:
            routes = _routes(r, s.value_node("routes"), s.at("routes"), pools)
            if routes is not None:
                kwargs["routes"] = routes
        if has_redirect:
            kwargs["redirect_https"] = s.get("redirect_https", _redirect_template)
        if "tls" in s.entries:
            kwargs["tls"] = _tls(r, s.value_node("tls"), s.at("tls"))
        # not given: ListenerConfig turns it on for TLS listeners (ALPN) and off for plain
        kwargs.update(s.fields(http2=v.boolean))
    if not r.clean_since(mark):
        return None, s
    if mode is not ABSENT:
        kwargs["mode"] = mode
    return ListenerConfig(name=name, bind=bind, **kwargs), s


def _routes(
    r: Reader, node: yaml.Node | None, loc: str, pools: set[str] | None
) -> tuple[Route, ...] | None:
    nodes = r.sequence(node, loc, "routes")
    if nodes is None:
        return None
    if not nodes:
        r.problem(
            loc, "routes must not be empty (a route {pool: NAME} matches every request)", node
        )
        return None
    mark = r.checkpoint()
    routes: list[Route] = []
    for i, route_node in enumerate(nodes):
        s = Section(r, route_node, f"{loc}[{i}]", _ROUTE_KEYS)
        if not s.ok:
            continue
        # any string: a badly named pool is reported once, at the pool itself
        pool = s.get("pool", v.string, required=True)
        if pool is not ABSENT:
            check_pool_ref(r, pool, s.at("pool"), s.value_node("pool"), pools)
        fields = s.fields(host=v.route_host, path_prefix=v.path_prefix)
        if pool is not ABSENT:
            routes.append(Route(pool=pool, **fields))
    return tuple(routes) if r.clean_since(mark) else None


def check_pool_ref(
    r: Reader, pool: str, loc: str, node: yaml.Node | None, pools: set[str] | None
) -> None:
    # when the pools section itself is broken, every reference would be noise
    if pools is not None and pool not in pools:
        known = ", ".join(sorted(pools)) or "none"
        r.problem(
            loc, f"pool '{pool}' is not defined{v.suggest(pool, pools)} (pools: {known})", node
        )


def _tls(r: Reader, node: yaml.Node | None, loc: str) -> TlsConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, loc, _TLS_KEYS)
    if not s.ok:
        return None
    if not s.has("certificates"):
        r.problem(
            s.at("certificates"), "at least one certificate is required", s.line("certificates")
        )
        return None
    nodes = r.sequence(s.value_node("certificates"), s.at("certificates"), "{cert, key}")
    if nodes is not None and not nodes:
        r.problem(
            s.at("certificates"),
            "at least one certificate is required",
            s.value_node("certificates"),
        )
    certificates: list[TlsCertificate] = []
    for i, cert_node in enumerate(nodes or ()):
        cs = Section(r, cert_node, f"{s.at('certificates')}[{i}]", _CERT_KEYS)
        if not cs.ok:
            continue
        cert = cs.get("cert", r.readable_path, required=True)
        key = cs.get("key", r.readable_path, required=True)
        if cert is ABSENT or key is ABSENT:
            continue
        why = _load_error(cert, key)
        if why is not None:
            r.problem(cs.loc, why, cert_node)
        certificates.append(TlsCertificate(cert=cert, key=key))
    min_version = s.fields(min_version=_min_version)
    if not r.clean_since(mark):
        return None
    return TlsConfig(certificates=tuple(certificates), **min_version)


def _load_error(cert: str, key: str) -> str | None:
    """Why a certificate and key cannot serve TLS, checked now so `balancer check` sees it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # the password callback stops OpenSSL from prompting on a terminal for an encrypted key
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            return f"the key {key} does not match the certificate {cert}"
        return (
            f"cannot load certificate {cert} with key {key} (not PEM, or the key is encrypted): {e}"
        )
    except (OSError, ValueError) as e:
        return f"cannot load certificate {cert} with key {key}: {e}"
    return None


def _redirect_template(value: object) -> str:
    text = v.string(value)
    if not text.startswith("https://"):
        raise ValueError(f"must be an https:// URL such as 'https://{{host}}:8443', got {text!r}")
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(text)
            if name is not None
        ]
    except ValueError as e:
        raise ValueError(f"invalid template {text!r}: {e}") from None
    if any(field != ("host", "", None) for field in fields):
        raise ValueError(f"the only placeholder allowed is {{host}}, got {text!r}")
    if not urllib.parse.urlsplit(text.replace("{host}", "example.com")).netloc:
        raise ValueError(f"{text!r} names no host: write 'https://{{host}}' or a host name")
    return text


def _min_version(value: object) -> str:
    # unquoted 1.2 in YAML is a float; accept it rather than make the operator quote it
    if isinstance(value, float) and value in (1.2, 1.3):
        return str(value)
    return v.choice("1.2", "1.3")(value)


def _overlaps(a: Address, b: Address) -> bool:
    """Whether two TCP bind addresses would collide (a wildcard overlaps every host)."""
    if a.port != b.port or a.port == 0:
        return False
    wildcard = ("0.0.0.0", "::")
    return a.host == b.host or a.host in wildcard or b.host in wildcard
