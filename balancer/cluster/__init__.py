"""Multi-process mode (`workers: N`): the owner process supervises N - 1 worker processes that
serve the same listeners through SO_REUSEPORT.

    channel.py     length-prefixed JSON frames over the owner <-> worker socketpair
    state.py       pure: backend state snapshot/apply, counter reports and their sums
    supervisor.py  the owner's side: spawn, feed, watch, respawn, drain
    worker.py      the worker process (`balancer worker --fd N`)
"""
