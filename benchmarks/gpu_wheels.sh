#!/usr/bin/env bash
# Builds .gpu/ (ignored by git) for gpu_session.sh, here, where pip can download. The CUDA machine has Python 3.12,
# torch and transformers, but neither MLX nor diffusers, no network, and one call carries at most 64 MiB: MLX's CUDA
# backend (a ~90 MB wheel) travels as an xz'd tar in two parts, one per call.
#   .gpu/a: part_aa (the first 50 MiB) + the diffusers wheel (+ importlib_metadata, which diffusers imports)
#   .gpu/b: part_ab (the rest) + the mlx wheel
#   bash benchmarks/gpu_wheels.sh        # MLX's version: the one installed here (MLX_VERSION=... for another)
set -euo pipefail
cd "$(dirname "$0")/.."
v=${MLX_VERSION:-$(python -c "import mlx.core as mx; print(mx.__version__)")}
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$w" \
  "mlx==$v" "mlx-cuda-13==$v" diffusers==0.42.1 importlib_metadata
mkdir -p "$w/x"
unzip -q "$w"/mlx_cuda_13-*.whl -d "$w/x"
tar c -C "$w/x" . | xz -T0 -6 | split -b 50M - "$w/part_"
[ ! -e "$w/part_ac" ] || { echo "MLX's CUDA backend needs more than two parts: split it over more calls" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/a .gpu/b
mv "$w/part_aa" "$w"/diffusers-*.whl "$w"/importlib_metadata-*.whl .gpu/a/
mv "$w/part_ab" "$w"/mlx-"$v"-*.whl .gpu/b/
du -sh .gpu/a .gpu/b
