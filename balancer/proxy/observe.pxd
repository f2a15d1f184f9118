# C types for balancer/proxy/observe.py when it is compiled (Cython pure-Python mode).
# Fields are `public`: interpreted code and tests use them as before. The exchange a finished
# request reports is typed: its fields are read as C struct members, not through getattr.

cimport cython

from balancer.proxy.exchange cimport Exchange

cdef class AccessLog:
    cdef public object format
    cdef public bint enabled
    cdef public int _fd
    cdef public bint _own
    cdef public Py_ssize_t _chunk, _pending
    cdef public list _lines
    cdef public long long _sec, _ms
    cdef public str _stamp, _ms_stamp

    @cython.locals(now=double, ms=cython.longlong, sec=cython.longlong)
    cpdef str _timestamp(self)
    @cython.locals(method=bytes, url=bytes)
    cpdef write(self, Exchange ex, double duration, bint broken)
    cpdef flush(self)


cdef class Observer:
    cdef public AccessLog access_log
    cdef public object metrics

    cpdef request_done(self, Exchange ex, bint broken=*)


@cython.locals(stats=dict, by_backend=dict, row=list, cls=int, at=Py_ssize_t)
cpdef count_row(metrics, ex, pool, backend_name, int status, Py_ssize_t bytes_out,
                Py_ssize_t body_received, double duration, bint broken)
