# C types for balancer/proxy/upstream.py when it is compiled (Cython pure-Python mode).
# Fields are `public`: interpreted code and tests use them as before. Lengths from the wire
# (content_length, remaining) stay Python ints: a C type would overflow where Python does not.

cdef class UpstreamConnection:
    cdef public object pool, transport, exchange
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


cdef class BackendConnections:
    cdef public object host, port, idle, keyed
    cdef public Py_ssize_t keyed_count, max_idle
    cdef public object watchdog, loop_time
    cdef public double backend_timeout, idle_timeout, connect_timeout
    cdef public object _loop
