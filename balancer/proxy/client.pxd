# C types for balancer/proxy/client.py when it is compiled (Cython pure-Python mode).
# Fields are `public`: interpreted code and tests use them as before.

from balancer.proxy.exchange cimport Exchange

cdef class ClientProtocol:
    cdef public object listener, transport, parser, client_ip, client_ip_b, origin
    cdef public bint admitted
    # requests
    cdef public Exchange parsing, active
    cdef public object queue
    cdef public Py_ssize_t head_size, head_raw, header_count, max_headers, max_header_bytes
    cdef public bint upgrade_pending
    # flow control
    cdef public int read_pause
    cdef public bint write_paused, closing, closed
    cdef public object tunnel
    # timeouts
    cdef public double deadline
    cdef public int deadline_kind
    cdef public object sniff
