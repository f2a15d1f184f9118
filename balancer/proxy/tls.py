"""TLS termination: server SSLContexts with modern defaults and SNI certificate selection."""

from __future__ import annotations

import ssl

from balancer.config import TlsConfig

# ECDHE with AEAD ciphers only for TLS 1.2 (TLS 1.3 suites are all modern and not set here)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS:!SHA1:!CBC"


def alpn_protocols(http2: bool) -> list[str]:
    """What the listener offers in ALPN: browsers pick h2 when it is first."""
    return ["h2", "http/1.1"] if http2 else ["http/1.1"]


def _base_context(min_version: str, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(alpn)
    return ctx


def _names_of(cert_file: str) -> list[str]:
    """DNS names (SAN, else CN) of the first certificate in a PEM file."""
    try:
        info = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError, AttributeError):
        return []
    names = [v for k, v in info.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        for rdn in info.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    names.append(v)
    return [n.lower() for n in names]


class SniSelector:
    """Maps a client's SNI name to the context holding the matching certificate; the first
    certificate is the default when no name matches or the client sends none."""

    def __init__(self, tls: TlsConfig, alpn: list[str]) -> None:
        self.alpn = alpn
        self.load(tls)

    def load(self, tls: TlsConfig) -> None:
        """Read every certificate file into new contexts, then swap them in at once: a file
        that fails to load raises before anything changed, so the last good set serves on."""
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        contexts = []
        for c in tls.certificates:
            ctx = _base_context(tls.min_version, self.alpn)
            ctx.load_cert_chain(c.cert, c.key)
            contexts.append(ctx)
            for name in _names_of(c.cert):
                if name.startswith("*."):
                    wildcard.setdefault(name[1:], ctx)
                else:
                    exact.setdefault(name, ctx)
        self.contexts = contexts
        self.exact = exact
        self.wildcard = wildcard

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.contexts[0]
        name = server_name.lower()
        ctx = self.exact.get(name)
        if ctx is None:
            dot = name.find(".")
            if dot > 0:
                ctx = self.wildcard.get(name[dot:])
        return ctx or self.contexts[0]


def build_ssl_context(tls: TlsConfig, *, http2: bool = False) -> ssl.SSLContext:
    """The listener's context: the first certificate, and an SNI callback for the others.
    ALPN is offered on every context: the one the SNI callback switches to is the one
    OpenSSL asks."""
    alpn = alpn_protocols(http2)
    selector = SniSelector(tls, alpn)
    outer = _base_context(tls.min_version, alpn)
    first = tls.certificates[0]
    outer.load_cert_chain(first.cert, first.key)

    def on_sni(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # every handshake takes its certificate from the selector, the default one included
        # (Python calls this with None when the client sends no SNI): a reload then only has
        # to swap the selector's contexts, and the outer context's own certificate, loaded
        # once at start, is never served again
        sslobj.context = selector.pick(server_name)

    outer.sni_callback = on_sni
    outer.balancer_sni = selector  # type: ignore[attr-defined]
    return outer


def reload_certificates(ctx: ssl.SSLContext, tls: TlsConfig, *, http2: bool = False) -> None:
    """Load renewed certificate files into a live listener's context (new handshakes use
    them; established connections are unaffected). `ctx` must be the context the listening
    server was created with. All or nothing: on a bad file this raises (ssl.SSLError or
    OSError) and the previous certificates keep serving."""
    selector = ctx.balancer_sni  # type: ignore[attr-defined]
    selector.alpn = alpn_protocols(http2)
    selector.load(tls)
    ctx.set_alpn_protocols(selector.alpn)
    # the protocol floor is read from the context the connection started on, not from the
    # one the SNI callback switches to
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
