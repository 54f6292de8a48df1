# Stand-in for the official prom/prometheus image, built from Debian's
# prometheus package, for sites that cannot pull from a registry
# (docs/DEPLOYMENT.md, "Installing at a site without registry access").
#
# It offers what compose/docker-compose.yml uses from the official image: the
# entrypoint /bin/prometheus taking the same flags, the data directory
# /prometheus owned by nobody (65534), port 9090, and wget for the
# healthcheck. Debian's Prometheus is older than the pinned official one;
# the stack's configuration and rules need nothing newer.

ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}

RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && test -x /bin/prometheus \
 && install -d -m 0755 -o nobody -g nogroup /prometheus

USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
