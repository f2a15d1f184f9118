"""Property-based fuzzing of the request path: random requests, split at random points, sent
to one real balancer in front of one recording backend.

Every generated request carries a model of what the client framed (method, target, headers,
body) and whether it is valid, known-invalid, or junk of unknown validity. The properties:

* valid and complete: a 2xx from the backend, and the backend received exactly the method,
  target, end-to-end headers (in order) and body content the client framed;
* valid but cut short (the client half-closes mid-body): no answer, and no request reached
  the backend;
* known-invalid framing (CL+TE, two lengths, broken chunks): a 4xx from the balancer, the
  connection closed, and no request reached the backend;
* junk (bytes in the method, target, version or a header line): either the valid outcome
  with exact forwarding, or a 4xx/5xx from the balancer with the connection closed and
  nothing forwarded;
* always: no hang (every read is bounded), and the balancer survives with no traceback logged.

CI runs the `ci` profile (200 examples). A longer run:
  HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/integration/test_fuzz_requests.py
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.harness import Balancer, Processes, config

# -- the target ------------------------------------------------------------------------------


@dataclass
class Target:
    lb: Balancer
    record: Path
    offset: int = 0
    by_id: dict[bytes, list[tuple[bytes, bytes]]] = field(default_factory=dict, repr=False)

    def forwarded(self, fuzz_id: bytes) -> list[tuple[bytes, bytes]]:
        """(head, body content) of every complete request the backend recorded with this id."""
        data = self.record.read_bytes() if self.record.exists() else b""
        while True:
            parsed = parse_record(data, self.offset)
            if parsed is None:
                break
            head, content, self.offset = parsed
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"x-fuzz-id":
                    self.by_id.setdefault(value.strip(), []).append((head, content))
        return self.by_id.get(fuzz_id, [])


def parse_record(data: bytes, at: int) -> tuple[bytes, bytes, int] | None:
    """One request as rawserver.py records it (head, body as framed, "\\n--END--\\n"),
    framed the way the balancer forwards: chunked or Content-Length. None if incomplete."""
    end = data.find(b"\r\n\r\n", at)
    if end < 0:
        return None
    head = data[at:end]
    pos = end + 4
    lower = head.lower()
    content = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(data[pos:line_end], 16)  # the balancer writes bare hex sizes
            chunk = data[line_end + 2 : line_end + 2 + size]
            if len(chunk) < size or data[line_end + 2 + size : line_end + 4 + size] != b"\r\n":
                return None
            content += chunk
            pos = line_end + 4 + size
            if size == 0:
                break
    else:
        for line in lower.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                n = int(line.split(b":", 1)[1])
                if len(data) < pos + n:
                    return None
                content = data[pos : pos + n]
                pos += n
    if data[pos : pos + 9] != b"\n--END--\n":
        return None
    return head, content, pos + 9


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    procs = Processes(tmp_path_factory.mktemp("fuzz"))
    try:
        port, record = procs.raw_backend("rec")
        lb = procs.balancer(config([("rec", port)], timeouts={"client_header": "5s"}))
        yield Target(lb, record)
    finally:
        procs.stop_all()


# -- generating requests ---------------------------------------------------------------------

ALPHA = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGIT = b"0123456789"
TCHAR = ALPHA + DIGIT + b"!#$%&'*+-.^_`|~"
PCHAR = ALPHA + DIGIT + b"-._~!$&'()*+,;=:@"
HEX = b"0123456789abcdefABCDEF"
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"PROPFIND"]
# names with a meaning to the balancer: never drawn as random names, only on purpose
SPECIAL = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"upgrade",
    b"expect",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-fuzz-id",
}
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer"}
HOP_BY_HOP |= {b"transfer-encoding", b"upgrade"}
SET_BY_BALANCER = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"expect"}
NOT_NOMINABLE = {b"close", b"keep-alive", b"upgrade", b"content-length", b"host"}

fuzz_ids = itertools.count(1)


def chars(alphabet: bytes, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


def no_line_breaks(min_size: int, max_size: int, also: bytes = b"") -> st.SearchStrategy[bytes]:
    """Junk bytes that keep the request's line structure (no CR or LF, nor any of `also`), so
    what the client framed stays unambiguous."""
    table = bytes.maketrans(b"\r\n" + also, b"xy" + b"z" * len(also))
    return st.binary(min_size=min_size, max_size=max_size).map(lambda b: b.translate(table))


@st.composite
def random_case(draw: st.DrawFn, name: bytes) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(
        c ^ 0x20 if flip and chr(c).isalpha() else c for c, flip in zip(name, flips, strict=True)
    )


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    pct = st.tuples(st.sampled_from(HEX), st.sampled_from(HEX)).map(lambda t: b"%" + bytes(t))
    pchar = st.one_of(st.sampled_from(PCHAR).map(lambda c: bytes([c])), pct)
    segments = draw(st.lists(st.lists(pchar, max_size=8).map(b"".join), min_size=1, max_size=4))
    path = b"/" + b"/".join(segments)
    if draw(st.booleans()):
        query = st.one_of(pchar, st.sampled_from([b"/", b"?"]))
        path += b"?" + b"".join(draw(st.lists(query, max_size=16)))
    return path


field_values = st.lists(
    st.one_of(st.integers(0x21, 0x7E), st.integers(0x80, 0xFF), st.sampled_from([0x20, 0x09])),
    max_size=30,
).map(lambda v: bytes(v).strip(b" \t"))


@st.composite
def end_to_end_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    names = chars(TCHAR, 1, 16).filter(lambda n: n.lower() not in SPECIAL)
    pool = draw(st.lists(names, min_size=1, max_size=4))  # few names: duplicates are likely
    headers = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(random_case(draw(st.sampled_from(pool))))
        headers.append((name, draw(field_values)))
    return headers


@st.composite
def special_headers(draw: st.DrawFn, nominee: bytes | None) -> list[tuple[bytes, bytes]]:
    """Headers the balancer treats specially, with valid values."""
    options = [
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"spoofed.test"),
        (b"Expect", b"100-continue"),
        (b"TE", b"trailers"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Connection", b"keep-alive"),
        (b"Connection", b"close"),
        (b"Connection", b"content-length, host"),  # must not strip framing or Host
        (b"Cookie", b"a=b; c=d"),
    ]
    if nominee is not None:
        options.append((b"Connection", nominee))
    chosen = draw(st.lists(st.sampled_from(options), max_size=3))
    return [(draw(random_case(n)), v) for n, v in chosen]


@dataclass
class Request:
    fuzz_id: bytes
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # as sent, in order (framing headers included)
    body: bytes  # the content the client framed (de-chunked)
    wire: bytes
    kind: str  # "valid" | "invalid" | "junk"
    complete: bool  # every byte of the framed message was sent
    half_close: bool
    cuts: list[int]
    pause: float


def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=4))))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    out = b""
    for piece in pieces:
        if not piece:
            continue
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper()
        ext = b""
        if draw(st.integers(0, 3)) == 0:
            ext = b";" + draw(chars(TCHAR, 1, 6))
            if draw(st.booleans()):
                ext += b"=" + draw(chars(TCHAR, 1, 6))
        out += size + ext + b"\r\n" + piece + b"\r\n"
    out += b"0\r\n"
    if draw(st.integers(0, 3)) == 0:
        out += b"X-Trailer: " + draw(chars(TCHAR, 0, 8)) + b"\r\n"
    return out + b"\r\n"


def break_chunked(draw: st.DrawFn, framed: bytes) -> bytes:
    """A chunked body made certainly invalid."""
    first_line = framed.index(b"\r\n")
    how = draw(st.sampled_from(["size-junk", "bare-lf", "ext-ctl", "data-overrun"]))
    if how == "size-junk":  # a non-hex character in the size (before any extension)
        digits = len(framed) - len(framed.lstrip(HEX))
        return framed[:digits] + b"g" + framed[digits:]
    if how == "bare-lf":  # LF without CR after the size line
        return framed[:first_line] + b"\n" + framed[first_line + 2 :]
    if how == "ext-ctl":  # a control character in a chunk extension
        return framed[:first_line] + b";e=\x01" + framed[first_line:]
    size = int(framed[:first_line].split(b";")[0], 16)  # one byte more than the size says
    at = first_line + 2 + size
    return framed[:at] + b"Z" + framed[at:]


@st.composite
def requests_(draw: st.DrawFn) -> Request:
    fuzz_id = b"%010d" % next(fuzz_ids)  # fixed width: the draws must not depend on it
    kind = "valid"
    complete = True
    method = draw(st.sampled_from(METHODS))
    target = draw(targets())
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    body = draw(st.binary(max_size=300))
    framing = draw(
        st.sampled_from(
            ["none", "length", "length", "chunked", "chunked", "short-length", "long-length"]
            + ["unterminated", "broken-chunks", "length-and-chunked", "two-lengths"]
        )
    )
    headers = draw(end_to_end_headers())
    nominee = headers[0][0] if headers and draw(st.booleans()) else None
    headers += draw(special_headers(nominee))
    headers = draw(st.permutations(headers))
    host_at = draw(st.integers(0, len(headers)))
    headers.insert(host_at, (draw(random_case(b"Host")), b"fuzz.test"))
    headers.insert(draw(st.integers(0, len(headers))), (b"X-Fuzz-Id", fuzz_id))

    framed = b""
    if framing == "none":
        body = b""
    elif framing in ("length", "short-length", "long-length"):
        n = len(body)
        if framing == "short-length" and body:
            n = draw(st.integers(0, len(body) - 1))
        elif framing == "long-length":
            n = len(body) + draw(st.integers(1, 50))
            complete = False
        headers.append((draw(random_case(b"Content-Length")), b"%d" % n))
        framed = body
        body = body[:n]
    else:
        headers.append((draw(random_case(b"Transfer-Encoding")), b"chunked"))
        framed = chunked(draw, body)
        if framing == "unterminated":
            framed = framed[: framed.rindex(b"0\r\n")]
            complete = False
        elif framing == "broken-chunks":
            framed = break_chunked(draw, framed if body else b"3\r\nabc\r\n" + framed)
            kind = "invalid"
        elif framing == "length-and-chunked":
            headers.insert(
                draw(st.integers(0, len(headers))), (b"Content-Length", b"%d" % len(framed))
            )
            kind = "invalid"
    if framing == "two-lengths":
        headers.append((b"Content-Length", b"%d" % len(body)))
        headers.append((b"Content-Length", b"%d" % (len(body) + 1)))
        framed = body
        kind = "invalid"
    if version == b"HTTP/1.0" and framing not in ("none", "length", "short-length", "long-length"):
        kind = "invalid"  # Transfer-Encoding in HTTP/1.0 is faulty framing (RFC 9112 6.1)

    junk = draw(st.sampled_from(["none"] * 6 + ["method", "target", "version", "header", "line"]))
    if junk == "method":
        method = draw(no_line_breaks(1, 12, also=b" "))
    elif junk == "target":
        target = draw(no_line_breaks(1, 30, also=b" "))
    elif junk == "version":
        version = draw(no_line_breaks(1, 10))
    elif junk == "header":
        name = draw(no_line_breaks(1, 10, also=b":"))
        headers.insert(draw(st.integers(0, len(headers))), (name, draw(no_line_breaks(0, 20))))
    elif junk == "line":
        line = draw(no_line_breaks(1, 20))
        headers.insert(draw(st.integers(0, len(headers))), (line, None))  # type: ignore[arg-type]
    if junk != "none" and kind == "valid":
        kind = "junk"

    head = method + b" " + target + b" " + version + b"\r\n"
    for name, value in headers:
        head += name + b"\r\n" if value is None else name + b": " + value + b"\r\n"
    wire = head + b"\r\n" + framed
    if not complete and kind == "valid":
        half_close = True  # else the balancer rightly waits for the rest
    else:
        half_close = draw(st.booleans()) if kind == "valid" else True
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=6))))
    return Request(
        fuzz_id=fuzz_id,
        method=method,
        target=target,
        version=version,
        headers=[h for h in headers if h[1] is not None],
        body=body,
        wire=wire,
        kind=kind,
        complete=complete,
        half_close=half_close,
        cuts=cuts,
        pause=draw(st.sampled_from([0.0, 0.0, 0.0005, 0.002])),
    )


# -- talking to the balancer -----------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


@dataclass
class Outcome:
    responses: list[Response]
    closed: bool  # the balancer closed (FIN or reset) before our read timeout
    reset: bool
    rest: bytes  # bytes after the last complete response


def parse_responses(data: bytes, head_request: bool) -> tuple[list[Response], bytes]:
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out, data
        lines = data[:end].split(b"\r\n")
        status_line = lines[0]
        assert status_line.startswith(b"HTTP/1.1 ") and status_line[9:12].isdigit(), data[:200]
        status = int(status_line[9:12])
        headers = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines[1:]]
        assert all(len(h) == 2 for h in headers), lines
        length = 0
        first_final = status >= 200 and not any(r.status >= 200 for r in out)
        if not (100 <= status < 200 or head_request and first_final and status < 300):
            for n, v in headers:
                if n.lower() == b"content-length":
                    length = int(v)
        assert not any(n.lower() == b"transfer-encoding" for n, _ in headers)  # all CL-framed
        if len(data) < end + 4 + length:
            return out, data
        out.append(Response(status, headers, data[end + 4 : end + 4 + length]))  # type: ignore[arg-type]
        data = data[end + 4 + length :]


def send(req: Request, port: int) -> Outcome:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pieces = [
            req.wire[a:b] for a, b in zip([0, *req.cuts], [*req.cuts, len(req.wire)], strict=True)
        ]
        try:
            for i, piece in enumerate(pieces):
                if i and req.pause:
                    time.sleep(req.pause)
                s.sendall(piece)
            if req.half_close:
                s.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise  # the balancer stopped reading a few KiB: a hang
        except OSError:
            pass  # reset, EPIPE, ENOTCONN: it already refused and closed; what did it answer?
        data = b""
        reset = False
        closed = False
        head_request = req.method == b"HEAD"
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                reset = closed = True
                break
            except TimeoutError:
                break  # judged below: a hang only if an answer or a close was due
            if not chunk:
                closed = True
                break
            data += chunk
            responses, _ = parse_responses(data, head_request)
            finals = [r for r in responses if r.status >= 200]
            if finals and 200 <= finals[0].status < 300 and not req.half_close:
                break  # a keep-alive answer: nothing more is due
        responses, rest = parse_responses(data, head_request)
        return Outcome([r for r in responses if r.status >= 200], closed, reset, rest)
    finally:
        s.close()


# -- the oracle ------------------------------------------------------------------------------


def expected_forwarded_headers(req: Request) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers, in order, as the backend must get them."""
    tokens = set()
    for n, v in req.headers:
        if n.lower() == b"connection":
            tokens |= {t.strip().lower() for t in v.split(b",") if t.strip()}
    named = tokens - NOT_NOMINABLE
    out = []
    for n, v in req.headers:
        ln = n.lower()
        if ln in HOP_BY_HOP or ln in SET_BY_BALANCER or ln in named:
            continue
        out.append((n, v))
    return out


def check_forwarded(req: Request, head: bytes, content: bytes, exact_headers: bool) -> None:
    lines = head.split(b"\r\n")
    assert lines[0] == req.method + b" " + req.target + b" HTTP/1.1", (lines[0], req.wire[:200])
    assert content == req.body
    got = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines[1:]]
    framing = [
        (n.lower(), v) for n, v in got if n.lower() in (b"content-length", b"transfer-encoding")
    ]
    # exactly one framing, and the unambiguous one
    assert framing in (
        [(b"transfer-encoding", b"chunked")],
        [(b"content-length", b"%d" % len(content))],
    ) or (framing == [] and content == b""), framing
    xff = [v for n, v in got if n.lower() == b"x-forwarded-for"]
    client_xff = [v for n, v in req.headers if n.lower() == b"x-forwarded-for"]
    assert xff == [b", ".join([*client_xff, b"127.0.0.1"])]
    assert [v for n, v in got if n.lower() == b"x-forwarded-proto"] == [b"http"]
    if exact_headers:
        rest = [
            (n, v)
            for n, v in got
            if n.lower() not in SET_BY_BALANCER
            and n.lower() not in (b"content-length", b"transfer-encoding")
        ]
        want = [
            (n, v) for n, v in expected_forwarded_headers(req) if n.lower() != b"content-length"
        ]
        assert rest == want, (rest, want)


# ~10-30 ms an example: the bound grows with the profile's example count (ci: the default 120 s)
@pytest.mark.timeout(max(120, settings.default.max_examples // 10))
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests_())
def test_fuzzed_requests(target: Target, req: Request) -> None:
    out = send(req, target.lb.port)
    assert target.lb.proc.poll() is None, "the balancer died"
    first = out.responses[0] if out.responses else None
    forwarded = target.forwarded(req.fuzz_id)
    context = (req.kind, req.complete, req.half_close, req.wire[:300], out)
    # the mix of cases and outcomes (shown with --hypothesis-show-statistics)
    event(f"{req.kind}{'' if req.complete else ' cut short'}: {first.status if first else '-'}")

    if req.kind == "valid" and req.complete:
        assert first is not None, ("no answer to a valid request", context)
        assert 200 <= first.status < 300 and first.header(b"x-raw") == b"1", context
        assert len(forwarded) == 1, context
        check_forwarded(req, *forwarded[0], exact_headers=True)
        if req.half_close:
            assert out.closed, ("half-closed client left open", context)
        return
    if req.kind == "valid":  # cut short by the half-close
        assert first is None and out.closed and not out.rest, context
        assert forwarded == [], context
        return
    if first is not None and 200 <= first.status < 300:
        # junk the balancer accepted: it must have forwarded exactly what the client framed
        assert req.kind == "junk", ("invalid framing accepted", context)
        assert first.header(b"x-raw") == b"1" and len(forwarded) == 1, context
        check_forwarded(req, *forwarded[0], exact_headers=False)
        return
    if first is not None:
        assert first.status >= 400 and first.header(b"x-raw") is None, context
        assert (first.header(b"connection") or b"").lower() == b"close", context
    # refused: closed (the answer may be lost to a reset if the client was still sending)
    assert out.closed, ("neither answered nor closed: a hang", context)
    assert forwarded == [], context


def test_balancer_survived_the_fuzzing(target: Target) -> None:
    # runs after the property test (file order): the process is alive and nothing escaped
    assert target.lb.proc.poll() is None
    log = target.lb.log_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 500 :][:3000]
    status = target.lb.status()
    assert status["listeners"][0]["rejected"] > 0  # the invalid cases really were refused
