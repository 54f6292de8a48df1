# Stand-in for the official postgres:15 image, built from Debian's
# postgresql-15 package, for sites that cannot pull from a registry
# (docs/DEPLOYMENT.md, "Installing at a site without registry access").
#
# It offers what compose/docker-compose.yml uses from the official image:
# POSTGRES_PASSWORD, POSTGRES_USER, POSTGRES_DB (and POSTGRES_INITDB_ARGS,
# POSTGRES_HOST_AUTH_METHOD, /docker-entrypoint-initdb.d), the data directory
# /var/lib/postgresql/data (PGDATA), port 5432, psql and pg_isready on PATH,
# the postgres user with uid 999, and SIGINT as the stop signal.
#
#   podman build -f docker/standins/postgres.Dockerfile \
#       --build-arg BASE_IMAGE=localhost/dcs-debian:bookworm -t dcs-standin-postgres:15 docker/standins

ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}

# The same uid/gid as the official image, so a data volume moves between the
# two; no cluster is created at install time (the entrypoint makes one).
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql \
        --shell /bin/bash postgres \
 && mkdir -p /etc/postgresql-common \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
 && printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && install -d -m 2777 -o postgres -g postgres /var/run/postgresql \
 && install -d -m 0700 -o postgres -g postgres /var/lib/postgresql/data

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
