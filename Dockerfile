# The daemon on a CUDA GPU. Weights are never baked in: models/, inbox/, outbox/ are volumes.
#   docker build -t idrep .
#   docker compose up            (one service per GPU; see compose.yaml)
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Offline by construction: no hub, no telemetry, no progress bars in logs.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY daemon ./daemon
COPY config.toml ./config.toml
# torch comes from the base image (the pinned range accepts it). insightface asks for the GUI
# opencv build; keep the headless one. onnxruntime-gpu runs the face models on the GPU.
RUN pip install . \
 && pip uninstall -y opencv-python onnxruntime \
 && pip install --force-reinstall --no-deps "opencv-python-headless>=4.9,<5.1" "onnxruntime-gpu>=1.18,<1.33" \
 && python -c "import engine, daemon, cv2, onnxruntime; print(onnxruntime.get_available_providers())"

RUN useradd --create-home --uid 1000 idrep \
 && mkdir -p /app/models /data/inbox /data/outbox /data/failed \
 && chown -R idrep:idrep /app/models /data
USER idrep
VOLUME ["/app/models", "/data"]
EXPOSE 9108

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('METRICS_PORT', '9108'), timeout=4)" || exit 1

# The work area must be on the inbox's file system (claiming is a rename), so it is a hidden
# folder inside the inbox volume rather than a volume of its own.
ENTRYPOINT ["python", "-m", "daemon", "--config", "/app/config.toml", "--inbox", "/data/inbox", "--outbox", "/data/outbox", \
            "--failed", "/data/failed", "--work", "/data/inbox/.work"]
