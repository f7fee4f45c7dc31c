# The lrpilot daemon (`lrpilot serve`) as a container: the sidecar of a training job, or a
# shared daemon for many. deploy/README.md explains configuration, auth and the examples.
#
#   docker build -t lrpilot .
#   docker run --rm --network host lrpilot                      # ws://127.0.0.1:8765/ws
#   docker run -d -p 8765:8765 -e LRPILOT_AUTH_TOKEN=... -v lrpilot-state:/var/lib/lrpilot lrpilot
#
# Config: /etc/lrpilot/config.yaml (the repository's config.yaml, bound to 0.0.0.0, state under
# /var/lib/lrpilot); mount your own file there, or override single keys with LRPILOT_X__Y
# variables (LRPILOT_SERVER__PORT=9000). Without a token (LRPILOT_AUTH_TOKEN, LRPILOT_JOB_TOKEN
# or auth.tokens) the daemon answers loopback peers only.

ARG PYTHON_IMAGE=python:3.12-slim

# ---------------------------------------------------------------- wheels of the two packages
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY clients/ clients/
# README.md* : the project's readme, when there is one (setuptools builds without it)
COPY pyproject.toml README.md* ./
COPY monitor/ monitor/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./clients . \
    && rm -rf clients/build build

# ---------------------------------------------------------------- the daemon
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so a volume or a Kubernetes securityContext (runAsUser/fsGroup) can match it.
RUN groupadd --system --gid 10001 lrpilot \
    && useradd --system --uid 10001 --gid lrpilot --home-dir /var/lib/lrpilot --no-create-home \
       --shell /usr/sbin/nologin lrpilot

# Third-party dependencies first, read from the two pyproject.toml files: this layer stays
# cached while only the code changes. (The daemon's dependency "lrpilot" is the client itself.)
COPY pyproject.toml /tmp/deps/pyproject.toml
COPY clients/pyproject.toml /tmp/deps/clients/pyproject.toml
RUN python -c "import re, tomllib; \
deps = [d for f in ('/tmp/deps/pyproject.toml', '/tmp/deps/clients/pyproject.toml') \
        for d in tomllib.load(open(f, 'rb'))['project']['dependencies']]; \
print('\n'.join(d for d in deps if re.split(r'[\s<>=!~;\[(]', d)[0] != 'lrpilot'))" \
        >/tmp/deps/requirements.txt \
    && pip install --no-cache-dir -r /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps

# Then the two packages, and `pip check` that nothing they need is missing.
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels && pip check

# The default config: the repository's, listening on every interface (the container's network
# is its boundary) with state and TensorBoard output in the volume. The build fails if the
# rewritten file no longer says so (config.yaml changed shape) or does not validate.
COPY config.yaml /tmp/config.yaml
RUN mkdir -p /etc/lrpilot /var/lib/lrpilot /usr/local/lib/lrpilot \
    && sed -e 's|^\(  host: *\)127\.0\.0\.1|\10.0.0.0|' \
           -e 's|^\(  state_dir: *\)\./lrpilot-state|\1/var/lib/lrpilot/state|' \
           -e 's|^\(  log_dir: *\)\./lrpilot-tb|\1/var/lib/lrpilot/tensorboard|' \
           /tmp/config.yaml >/etc/lrpilot/config.yaml \
    && rm /tmp/config.yaml \
    && python -c "from monitor.config import load_config; \
c = load_config('/etc/lrpilot/config.yaml', environ={}); \
assert c.server.host == '0.0.0.0', c.server.host; \
assert str(c.storage.state_dir) == '/var/lib/lrpilot/state', c.storage.state_dir; \
assert str(c.tensorboard.log_dir) == '/var/lib/lrpilot/tensorboard', c.tensorboard.log_dir" \
    && chown -R lrpilot:lrpilot /var/lib/lrpilot
COPY deploy/healthcheck.py /usr/local/lib/lrpilot/healthcheck.py

# Declared after the chown: a new volume starts as a copy of this directory, owned by lrpilot.
VOLUME ["/var/lib/lrpilot"]
WORKDIR /var/lib/lrpilot
USER lrpilot:lrpilot
EXPOSE 8765

# Python only (no curl in slim); reads the port from the same config and environment.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/lib/lrpilot/healthcheck.py", "/etc/lrpilot/config.yaml"]

# Exec form: `lrpilot` (a Python script) is PID 1 and receives `docker stop`'s SIGTERM itself;
# the daemon closes connections with 1001, flushes its journal and exits 0 within
# server.shutdown_grace_seconds (5 s by default, inside docker stop's 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lrpilot", "serve", "--config", "/etc/lrpilot/config.yaml"]
CMD []
