# settle: multi-stage image.
#
# The build stage runs the same script as CI (ops/test.sh --quick: dependencies, format-free
# release build, unit tests), so an image is only produced from a tree whose unit tests pass.
# The runtime stage is a slim Debian with only the runtime libraries, a non-root user and the
# binary. Integration tests need servers and run in CI (ops/test.sh), not here.
FROM debian:bookworm AS build
WORKDIR /src
COPY . .
RUN bash ops/deps.sh && bash ops/test.sh --quick \
    && strip -o /settle build/release/settle

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       libuv1 libhiredis0.14 libcurl4 libpq5 libjansson4 libmicrohttpd12 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin settle
COPY --from=build /settle /usr/local/bin/settle
USER settle
# The worker sizes libuv's thread pool from SETTLE_CONCURRENCY unless UV_THREADPOOL_SIZE is
# set; leave it unset so the two cannot disagree.
ENV SETTLE_CONCURRENCY=32 \
    SETTLE_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
# Liveness of the worker process (readiness, /readyz, is for orchestrators that route work).
# curl is the only extra runtime package; the `pgsim` and `migrate` commands override or
# disable this check in ops/compose.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9464/healthz"]
# SIGTERM drains: in-flight jobs get SETTLE_SHUTDOWN_GRACE_MS (20 s) before they are handed
# back, so give the container more than that (docker stop -t 30; Kubernetes uses 45 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/settle"]
CMD ["work"]
