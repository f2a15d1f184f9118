# The balancer daemon as a container image.
#
#   docker build -t balancer .
#   docker run --rm -p 8080:8080 -p 9000:9000 --stop-timeout 35 \
#       -v "$PWD/config:/etc/balancer" balancer
#
# The config directory is mounted at /etc/balancer and must hold balancer.yaml. Inside a
# container the listeners and admin must bind 0.0.0.0 (not 127.0.0.1) to be reachable through
# -p. Without sticky.key_file the balancer writes a generated sticky key beside the config, so
# mount the directory writable by uid 10001, or give key_file a path that is.
# SIGTERM drains in-flight requests for up to timeouts.drain (30s by default): --stop-timeout
# (or compose's stop_grace_period) should be longer than that, or docker kills mid-drain.
# The HA floating IP needs NET_ADMIN and NET_RAW, which a non-root user does not have; run an
# HA node with --cap-add NET_ADMIN --cap-add NET_RAW --user root, on the host network.
# The registry of docker-compose.yml's discovery demo: Debian's etcd-server, nothing else.
# (`docker build --target etcd .`; the balancer image below is the default target.)
FROM debian:bookworm-slim AS etcd
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/bin/etcd"]

FROM python:3.11-slim AS balancer

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# .dockerignore lets only the package sources through, so this layer changes only with them.
COPY . /src
RUN pip install /src \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin balancer \
    && mkdir -p /etc/balancer \
    && chown balancer:balancer /etc/balancer

USER balancer
WORKDIR /etc/balancer

EXPOSE 8080 9000

# python's urllib because the slim image has no curl; urlopen raises on a refused connection
# or any non-2xx answer, which exits 1 = unhealthy. BALANCER_HEALTH_URL overrides the address
# when admin.bind is not on port 9000.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('BALANCER_HEALTH_URL', 'http://127.0.0.1:9000/healthz'), timeout=3)"]

ENTRYPOINT ["balancer"]
CMD ["run", "-c", "/etc/balancer/balancer.yaml"]
