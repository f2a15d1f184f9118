"""Backends from outside the config file: registries (etcd, DNS) and how their answers become
changes to a pool."""
