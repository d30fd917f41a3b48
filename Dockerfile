# The daemon's image. Every Python package comes from a wheelhouse in the build context, checked
# against the lock's sha256 (locks/): the build reaches no package index, so an air-gapped lab
# builds (or loads) exactly the set that was tested. Weights are never baked in.
#
#   Lab (CUDA):  scripts/wheelhouse --cuda && docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t idrep .
#   Test (CPU):  scripts/wheelhouse --cpu wheelhouse-cpu && docker build --build-arg BASE=idrep-localbase:bookworm \
#                  --build-arg VARIANT=cpu --build-arg WHEELHOUSE=wheelhouse-cpu -t idrep:cpu .   (scripts/test-container)
#
# BASE must have CPython 3.11 with venv. The lab default's torch (2.7.1, CUDA 12.6) satisfies
# every pinned package: transformers 5 switches PyTorch off below 2.6. The CPU variant installs
# torch from the wheelhouse instead. Only the classic builder's features are used (no
# RUN --mount), so the docker of a Debian host builds it too.
ARG BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

FROM ${BASE} AS build
ARG VARIANT=cuda
ARG WHEELHOUSE=wheelhouse
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
COPY locks /src/locks
COPY ${WHEELHOUSE} /wheelhouse
# --system-site-packages: the CUDA base's torch stays visible (the cuda lock has no torch).
# --no-deps: the lock is the whole set (without the GUI opencv-python insightface asks for).
# The two sdists of the set (adamp, face_recognition_models) are built by the locked setuptools
# in the venv (--no-build-isolation): an isolated build would look for an index.
RUN test "$(cat /wheelhouse/VARIANT 2>/dev/null)" = "$VARIANT" \
      || { echo "the wheelhouse is not the $VARIANT one: run scripts/wheelhouse --$VARIANT" >&2; exit 1; } \
 && python3 -m venv --system-site-packages /opt/idrep \
 && grep '^setuptools==' /src/locks/requirements.lock > /tmp/setuptools.lock \
 && /opt/idrep/bin/pip install --no-index --find-links /wheelhouse --no-deps --require-hashes -r /tmp/setuptools.lock \
 && /opt/idrep/bin/pip install --no-index --find-links /wheelhouse --no-deps --require-hashes --no-build-isolation \
      -r /src/locks/requirements.lock -r /src/locks/${VARIANT}.lock
COPY pyproject.toml README.md /src/
COPY engine /src/engine
COPY daemon /src/daemon
RUN /opt/idrep/bin/pip install --no-index --no-deps --no-build-isolation /src \
 && /opt/idrep/bin/python -c "import torch, transformers, diffusers, engine, daemon, cv2, onnxruntime; \
print('torch', torch.__version__, 'providers', onnxruntime.get_available_providers())"

FROM ${BASE}
# Offline by construction: no hub, no telemetry, no progress bars in logs. HOME, USER and
# MPLCONFIGDIR let any uid run it (compose passes the invoking user's, which has no passwd entry).
ENV PATH=/opt/idrep/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    USER=idrep \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=build /opt/idrep /opt/idrep
# The image's config.toml is the fallback: compose mounts the lab's own over it (same path, so
# its relative paths, models = "models", still mean /app/models).
COPY config.toml /app/config.toml
RUN mkdir -p /app/models /data && chmod 0777 /data
WORKDIR /app
# The commit the image was built from (scripts/test-container passes it): the audit's first line
# and every report name it. Last, so that a new commit rebuilds no layer above.
ARG GIT_COMMIT=""
ENV IDREP_GIT_COMMIT=${GIT_COMMIT}
# Not root: compose runs it as the invoking user (UID/GID); 1000:1000 otherwise. The daemon
# creates inbox/, outbox/ and failed/ inside /data and names any mount it cannot write.
USER 1000:1000
VOLUME ["/app/models", "/data"]
EXPOSE 9108

# "ready", "waiting for models: ..." or "claiming paused: ..." (docker inspect shows it).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "-m", "daemon", "health"]

# The work area must be on the inbox's file system (claiming is a rename): a hidden folder
# inside the inbox.
ENTRYPOINT ["python", "-m", "daemon", "--config", "/app/config.toml", "--inbox", "/data/inbox", "--outbox", "/data/outbox", \
            "--failed", "/data/failed", "--work", "/data/inbox/.work", "--metrics-host", "0.0.0.0"]
