# GPU training image: the CUDA user-space libraries come with the torch and DALI wheels, so the
# base only needs the driver interface. System packages and Python requirements are installed by
# tools/setup.sh from pyproject.toml, exactly as `make setup` does outside the container.
#
# One CUDA major throughout (tests/test_docker.py checks that they agree): torch 2.14.1's wheels
# on PyPI are built with CUDA 13.0, DALI is its CUDA 13 build (nvidia-dali-cuda130, in
# pyproject.toml), and so is the base image, whose requirement (cuda>=13.0) makes a host driver
# too old for them (before R580) a clear error when the container starts.
#
#   docker build -t ssat .
#   docker run --gpus all --ipc=host -v /data:/data ssat \
#       torchrun --nproc_per_node=8 train.py --pipeline ffcv --data_path imagenet --data_dir /data/ffcv ...
FROM nvidia/cuda:13.0.0-base-ubuntu24.04
LABEL org.opencontainers.image.title="ssat" \
      ssat.torch="2.14.1" \
      ssat.cuda="13.0" \
      ssat.dali="nvidia-dali-cuda130"

ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1001 ssat && install -d -o ssat -g ssat /opt/ssat /data
WORKDIR /opt/ssat

# Dependencies first, so that a change to the code does not reinstall them. The editable install
# maps the four packages to these folders; the code itself is copied in below.
COPY pyproject.toml README.md ./
COPY tools/setup.sh tools/setup.sh
RUN mkdir ssat pipelines convert storage \
    && touch ssat/__init__.py pipelines/__init__.py convert/__init__.py storage/__init__.py \
    && PIP_NO_CACHE_DIR=1 tools/setup.sh \
    && rm -rf /var/lib/apt/lists/*

COPY --chown=ssat:ssat . .

USER 1001
ENV PATH=/opt/ssat/.venv/bin:$PATH \
    NUMBA_THREADING_LAYER=omp \
    PYTHONUNBUFFERED=1
# tini is the container's PID 1, so the command runs as it would outside one: the kernel gives PID 1
# no default action for a signal it has no handler for, and `docker stop` in the seconds before
# the trainer installs its own (imports) would wait for its SIGKILL. tini passes each signal on to
# the command, ends with the command's status and reaps the processes left orphaned.
ENTRYPOINT ["tini", "--"]
CMD ["python", "train.py"]
