# C types for balancer/proxy/upstream.py when it is compiled (Cython pure-Python mode).
# Fields are `public`: interpreted code and tests use them as before. Lengths from the wire
# (content_length, remaining) stay Python ints: a C type would overflow where Python does not.
# Per-response methods are `cpdef`: C calls between the compiled classes, methods to Python.

cimport cython

from balancer.proxy.exchange cimport Exchange

cdef class BackendConnections


cdef class UpstreamConnection:
    cdef public BackendConnections pool
    cdef public object transport
    cdef public Exchange exchange
    cdef public bint reused, closed
    cdef public double idle_since, deadline
    cdef public object proxy_key
    # response parsing
    cdef public int state
    cdef public object head_buf, parser
    cdef public int status
    cdef public object reason, headers, hop
    cdef public bint conn_named
    cdef public object content_length
    cdef public bint chunked, conn_close, upgrade_header
    cdef public object remaining
    cdef public bint received_any, message_complete
    cdef public object head_out

    cpdef _reset_response(self)
    cpdef data_received(self, data)
    # the head as bytes: slices, len() and startswith() are C operations
    @cython.locals(end=Py_ssize_t, head=bytes, low=bytes)
    cpdef _head_data(self, data)
    @cython.locals(at=Py_ssize_t, line_end=Py_ssize_t, value=bytes, status=int)
    cpdef _plain_head(self, bytes head, bytes low)
    cpdef _start_body(self, rest)
    cpdef _finish(self, reusable)
    cpdef send(self, data)
    cpdef request_sent(self)


cdef class BackendConnections:
    cdef public object host, port, idle, keyed
    cdef public Py_ssize_t keyed_count, max_idle
    cdef public object watchdog, loop_time
    cdef public double backend_timeout, idle_timeout, connect_timeout
    cdef public object _loop

    cpdef acquire_idle(self, proxy_header=*)
    cpdef release(self, conn)  # untyped: the idle pool works with any connection-like object
