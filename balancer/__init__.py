"""balancer: a reverse-proxy load balancer daemon on uvloop and httptools."""

__version__ = "0.1.0"
