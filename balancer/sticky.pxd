# C types for balancer/sticky.py when it is compiled (Cython pure-Python mode).
# Fields are `public`: interpreted code and tests use them as before. decode() runs for every
# request carrying the cookie: its cache lookup and expiry check are C operations.

cimport cython


cdef class StickyCodec:
    cdef public object pool
    cdef public double ttl
    cdef public bytes _pool_bytes
    cdef public tuple _macs
    cdef public dict _current_tag, _verified

    @cython.locals(known=tuple, expiry=cython.longlong)
    cpdef decode(self, value, double now)
