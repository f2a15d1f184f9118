# C types for balancer/proxy/hpack_codec.py when it is compiled (Cython pure-Python mode).
# The tables are module globals typed as bytes, so indexing one is a C array read; the
# Encoder's and Decoder's fields are `public` so h2 and the tests use them as before.

cimport cython

cdef bytes _H_NEXT, _H_SYMBOL, _H_FLAGS, _H_ACCEPT, _H_BITS
cdef list _H_CODES
cdef dict _STATIC_FIELDS, _STATIC_NAMES
cdef tuple _STATIC
cdef frozenset _SENSITIVE
cdef Py_ssize_t ENTRY_OVERHEAD, STATIC_LENGTH, MAX_INTEGER_OCTETS, _SHORT_COOKIE
cdef int _EMIT, _FAIL

cdef bytes _to_bytes(object value)

@cython.locals(state=Py_ssize_t, i=Py_ssize_t, at=Py_ssize_t, octet=cython.uchar,
               flag=cython.uchar, out=bytearray)
cpdef bytes huffman_decode(bytes data, Py_ssize_t start, Py_ssize_t end)

@cython.locals(total=Py_ssize_t, octet=cython.uchar)
cpdef Py_ssize_t huffman_length(bytes data)

@cython.locals(acc=cython.ulonglong, held=cython.int, n=cython.int, octet=cython.uchar)
cpdef huffman_encode(bytes data, bytearray out)

@cython.locals(limit=cython.longlong)
cdef _put_integer(bytearray out, long long value, int prefix_bits, int first)

@cython.locals(size=Py_ssize_t, coded=Py_ssize_t)
cdef _put_string(bytearray out, bytes data, bint huffman)


cdef class Encoder:
    cdef public list entries
    cdef public dict fields, names
    cdef public Py_ssize_t added, evicted, size, max_size, resize_min

    @cython.locals(name=bytes, value=bytes, sensitive=bint, index=Py_ssize_t,
                   name_index=Py_ssize_t, k=Py_ssize_t, size=Py_ssize_t, prefix=int,
                   first=int, indexed=bint, key=tuple)
    cdef _field(self, bytearray out, object header, bint huffman)

    @cython.locals(entries=list, key=tuple, k=Py_ssize_t)
    cdef _evict(self, Py_ssize_t room)


cdef class Decoder:
    cdef public list entries
    cdef public Py_ssize_t size, max_size, max_header_list_size, max_allowed_table_size
    cdef public Py_ssize_t pos

    @cython.locals(end=Py_ssize_t, limit=Py_ssize_t, headers=list, inflated=Py_ssize_t,
                   pos=Py_ssize_t, octet=cython.uchar, size=Py_ssize_t)
    cpdef list decode(self, data, bint raw=*)

    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, limit=cython.longlong,
                   value=cython.longlong, shift=int, count=int, octet=cython.uchar)
    cdef long long _integer(self, bytes data, int prefix_bits) except -1

    @cython.locals(pos=Py_ssize_t, coded=cython.uchar, length=cython.longlong, start=Py_ssize_t)
    cdef bytes _string(self, bytes data)

    @cython.locals(name=bytes)
    cdef tuple _literal(self, bytes data, Py_ssize_t pos, int prefix_bits)

    @cython.locals(dynamic=cython.longlong, entries=list)
    cdef tuple _entry(self, long long index)

    @cython.locals(size=Py_ssize_t)
    cdef _add(self, tuple field)

    @cython.locals(entries=list)
    cdef _evict(self, Py_ssize_t room)
