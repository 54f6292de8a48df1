# Stand-in for the official haproxy image, built from Debian's haproxy
# package, for sites that cannot pull from a registry (docs/DEPLOYMENT.md,
# "Installing at a site without registry access").
#
# It offers what compose/docker-compose.yml uses from the official image:
# the configuration at /usr/local/etc/haproxy/haproxy.cfg, the unprivileged
# haproxy user, the Prometheus exporter service, logs on stdout, and wget for
# the healthcheck (the official Alpine image has BusyBox's).

ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}

RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy wget \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && install -d -m 0755 /usr/local/etc/haproxy \
 && ln -s /etc/haproxy/errors /usr/local/etc/haproxy/errors

USER haproxy
WORKDIR /var/lib/haproxy
EXPOSE 8443 8404
# SIGUSR1 is HAProxy's soft stop, as in the official image.
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
