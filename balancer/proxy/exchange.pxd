# C types for balancer/proxy/exchange.py when it is compiled (Cython pure-Python mode).
# Fields are `public` so that interpreted code and tests read and write them as before;
# compiled code reaches them as C struct members. Numbers that come from the wire
# (content_length) stay Python ints: a C type would overflow where Python does not.
# The methods a request calls on every step are `cpdef`: a C call from compiled code that
# knows the type, still an ordinary method to Python (H2Exchange overrides some of them).

cimport cython


cdef class Exchange:
    cdef public object client, listener, client_ip
    # the request
    cdef public object method, url, version, headers
    cdef public bint keep_alive, is_head
    cdef public object host
    cdef public bint chunked
    cdef public object content_length
    cdef public Py_ssize_t body_received
    cdef public bint expect_continue, upgrade
    cdef public object fwd_head
    cdef public bint needs_host, prepared, request_complete
    cdef public object sticky_tag
    cdef public bint sticky_hit
    cdef public object early_tunnel_data
    # proxying
    cdef public object pool, backend, backend_name, conn, tried
    cdef public int attempts
    cdef public object body_buf
    cdef public Py_ssize_t body_buf_size
    cdef public bint replayable, body_sent, stale_retry, timed_out, gone
    cdef public object proxy_header
    # the response
    cdef public object local
    cdef public int local_status
    cdef public bint response_started
    cdef public int status
    cdef public bint rechunk, client_close
    cdef public Py_ssize_t bytes_out
    cdef public double started_at
    cdef public bint finished
    cdef public object set_cookie, held

    # the request's lists and bytes typed: appends, slices and lookups are C operations
    @cython.locals(lines=list, host_values=list, conn_values=list, xff=list, cookie_at=list,
                   name=bytes, value=bytes, lname=bytes, url=bytes, kinds=dict)
    cpdef prepare(self)
    cpdef request_body(self, data)
    cpdef request_done(self)
    cpdef start(self)
    cpdef dispatch(self)
    cpdef _attach(self, conn)
    cpdef response_body(self, data)
    cpdef response_done(self, reusable)
    cpdef _finish(self)
