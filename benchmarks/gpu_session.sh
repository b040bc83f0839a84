#!/usr/bin/env bash
# Benchmarks at the released configs on a CUDA machine that has torch but neither MLX nor diffusers and no
# network, with wheels brought along in .gpu/ (made here by benchmarks/gpu_wheels.sh): phase "torch" installs
# diffusers and times the references, phase "mlx" unpacks MLX's CUDA backend and times the port. Each phase
# writes its tables under $OUT (or ./gpu-results). One phase per device call, carrying .gpu/a or .gpu/b; the
# second follows on the still-warm machine (/tmp/keep holds the first half).
#   bash benchmarks/gpu_session.sh torch    # .gpu/a: first half of mlx-cuda + diffusers wheels
#   bash benchmarks/gpu_session.sh mlx      # .gpu/b: second half of mlx-cuda + the mlx wheel
#   bash benchmarks/gpu_session.sh stash    # .gpu/a only (then "dit" with .gpu/b): the MLX DiT variants alone
#   bash benchmarks/gpu_session.sh keep     # .gpu/a only, no benchmark: for a second "exec" on a warm machine
#   bash benchmarks/gpu_session.sh exec CMD...  # .gpu/b after stash or keep: set up MLX, then run CMD
#   bash benchmarks/gpu_session.sh whole-torch  # .gpu/a: whole generation, AR decoding and VAE, the references
#   bash benchmarks/gpu_session.sh whole-mlx    # .gpu/b, right after on the warm machine: the same, MLX
set -uo pipefail
phase=${1:?torch or mlx}
out=${OUT:-gpu-results}
mkdir -p "$out" /tmp/site /tmp/keep
export PYTHONUNBUFFERED=1
py=python3
log() { echo "=== $*" | tee -a "$out/$phase.log"; }
run() { log "$*"; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$out/$phase.log"; }

keep_first_half() {  # .gpu/a: the first half of mlx-cuda stays in /tmp for "exec"/"mlx"; diffusers installed
  cp .gpu/a/part_aa /tmp/keep/
  $py -m pip install -q --no-index --no-deps --target /tmp/site .gpu/a/*.whl
}

setup_mlx() {
  cat /tmp/keep/part_aa .gpu/b/part_ab | xz -d | tar x -C /tmp/site
  $py -m pip install -q --no-index --no-deps --target /tmp/mlxpy .gpu/b/mlx-*.whl
  cp -r /tmp/mlxpy/mlx/. /tmp/site/mlx/
  nv=$($py -c "import torch, os; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia'))")
  ln -sfn "$nv" /tmp/site/nvidia
  export LD_LIBRARY_PATH=$(ls -d /tmp/site/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
  export PYTHONPATH=/tmp/site:$PWD
  run $py -c "import mlx.core as mx; print(mx.__version__, mx.default_device())"
}

bandwidth() {  # GB/s of the GPU's memory, for the AR's share of its bound
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
    *H200*) echo 4800 ;; *H100*PCIe*) echo 2000 ;; *H100*) echo 3350 ;; *) echo 0 ;;
  esac
}

if [ "$phase" = whole-torch ]; then
  keep_first_half
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out/$phase.log"
  run $py benchmarks/bench_pipeline.py --config released --device gpu --sides diffusers --json "$out/pipeline_torch.json"
  run $py benchmarks/bench_prior.py --config released --device gpu --sides transformers --tokens 256 --bandwidth "$(bandwidth)"
  run $py benchmarks/bench_vae.py --device gpu --sizes 1024,2048 --sides torch --repeats 1 --json "$out/vae_torch.json"
elif [ "$phase" = whole-mlx ]; then
  setup_mlx
  run $py benchmarks/bench_pipeline.py --config released --device gpu --sides mlx --bits 0 4 --json "$out/pipeline_mlx.json"
  run $py benchmarks/bench_prior.py --config released --device gpu --sides mlx --profile --bandwidth "$(bandwidth)"
  run $py benchmarks/bench_prior.py --config released --device gpu --sides mlx --bits 4 --tokens 512 --bandwidth "$(bandwidth)"
  run $py benchmarks/bench_vae.py --device gpu --sizes 1024,2048 --sides mlx --repeats 1 --json "$out/vae_mlx.json"
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 --sides mlx --mlx-variants eval-per-block --iters 3 --json "$out/dit_mlx.json"
  run $py benchmarks/bench_pipeline.py --config released --device gpu --sides mlx --memory staged --json "$out/pipeline_mlx_staged.json"
elif [ "$phase" = keep ]; then  # only bring the first half over (the references were timed in this session)
  keep_first_half
elif [ "$phase" = stash ]; then
  keep_first_half
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out/$phase.log"
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 --sides torch --torch-compile --json "$out/dit_torch_1024.json"
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 2048 --sides torch --json "$out/dit_torch_2048.json"
elif [ "$phase" = exec ]; then
  setup_mlx
  shift
  run "$@"
elif [ "$phase" = dit ]; then
  setup_mlx
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 2048 --sides mlx \
    --mlx-variants lazy eval-per-block eval-per-block-sync --json "$out/dit_mlx_variants.json"
elif [ "$phase" = torch ]; then
  keep_first_half
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out/$phase.log"
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 2048 --sides torch --json "$out/dit_torch.json"
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 --sides torch --torch-compile --json "$out/dit_torch_compile.json"
  run $py benchmarks/bench_vae.py --device gpu --sizes 1024,2048 --sides torch --json "$out/vae_torch.json"
else
  setup_mlx
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 2048 --sides mlx --ops --json "$out/dit_mlx.json"
  run $py benchmarks/bench_transformer.py --device gpu --config released --sizes 1024 --sides mlx --quantize 4 --mlx-variants eval-per-block --json "$out/dit_mlx_q4.json"
  run $py benchmarks/bench_vae.py --device gpu --sizes 1024,2048 --sides mlx --json "$out/vae_mlx.json"
fi
log done
