# C types for balancer/backend.py when it is compiled (Cython pure-Python mode).
# Fields are `public`: every other module and the tests use them as before.

cdef class Backend:
    cdef public object name, host, port, weight, max_connections
    # health
    cdef public bint healthy
    cdef public object admin_state
    cdef public double ejected_until
    cdef public Py_ssize_t consecutive_failures, ejections
    cdef public double ejection_ended, slow_start_until, slow_start_began
    # live load
    cdef public Py_ssize_t inflight
    cdef public object reported_load
    cdef public Py_ssize_t inflight_at_report, sent_since_report
    # totals
    cdef public Py_ssize_t requests, errors, index
    # where it came from ("config", or a discovery source)
    cdef public object source
