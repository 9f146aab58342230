#!/usr/bin/env bash
# Runs the three cost benchmarks on an accelerator and writes their JSON and
# plots to benchmarks/results/gpu/ (or the folder given as $1).
#
# It installs nothing: run it in an environment where `pip install -e
# ".[example]"` and a CUDA build of JAX (for example `pip install
# "jax[cuda12]"`) are already installed. Sized to finish in under 5 minutes
# on one recent GPU; the scaling sweep stops at 1e7 elements.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"

python - <<'PY'
import jax
backend = jax.default_backend()
print(f"JAX {jax.__version__} on {backend}: {jax.devices()}")
if backend == "cpu":
    raise SystemExit("gpu.sh: error: JAX sees no accelerator; install a CUDA or TPU build of jax first")
PY

python benchmarks/update_cost.py --rounds 7 --out "$out"
python benchmarks/step_cost.py --rounds 7 --memory-steps 0 --out "$out"
python benchmarks/scaling.py --rounds 5 --out "$out"
echo "gpu.sh: wrote $(ls "$out")"
