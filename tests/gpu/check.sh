#!/usr/bin/env bash
# One prepared GPU check, run first whenever a GPU machine is lent (README "GPU check").
#
#   tests/gpu/check.sh [--out DIR] [--only STAGE[,STAGE]] [--budget SECONDS] [--wheels DIR]
#   tests/gpu/check.sh --dry-run --out DIR     # the same stages on CPU, tiny shapes
#
# Always: print versions (env.jsonl), install the wheels of --wheels (default .whl/, made by
# tests/gpu/fetch-wheels.sh) into a fresh target directory. Then the stages, each under a time
# budget, reported as skipped when it runs over:
#   tests       the CUDA tests (TRITON_INTERPRET=0): kernels (quantized linears too), the engine
#               on Triton vs the torch reference, CUDA-graph decode vs eager; a per-test time
#               cap                                                             -> tests.xml
#   kernels     tessera bench kernels: ceilings, attention vs SDPA, MoE vs cuBLAS, quantized
#               linears (W4A16, W8A8, fp8) vs cuBLAS bf16 and their roofline    -> kernels.jsonl
#   throughput  tessera bench throughput, Llama-3-8B shapes, dummy weights: 512 x 512 -> 128
#               beside transformers and the bound, the batch-1 decode step, graph capture time
#                                                                               -> throughput.jsonl
# Every figure lands under --out (default $OUT, else ./gpu-check-out) with the full log
# (check.log) and stage outcomes (stages.jsonl); summary.jsonl and the closing table hold each
# target figure, its target and the ratio. At most 8 files, as the device tool brings back.
#
# --dry-run runs every stage on this CPU: tiny shapes, interpreted Triton, a tiny dummy Llama,
# the quantized kernels' tests only (the suite runs every kernel test anyway), and the wheels
# installed with this machine's own copies of the packages the GPU image lacks hidden
# (tests/gpu/dryrun/sitecustomize.py). It proves the script and the wheel set; its figures
# measure nothing, and its budgets (several times an idle 2-core run) only catch a hang.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

out=${OUT:-./gpu-check-out}
only=tests,kernels,throughput
wheels=.whl
dry=0
budget=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for s in ${only//,/ }; do
  case "$s" in tests|kernels|throughput) ;; *) echo "check.sh: unknown stage $s" >&2; exit 2 ;; esac
done
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/{check.log,stages.jsonl,env.jsonl,tests.xml,kernels.jsonl,throughput.jsonl,summary.jsonl}
exec > >(tee -a "$out/check.log") 2>&1
export PYTHONUNBUFFERED=1

# Budgets (seconds) that keep a whole real run within 7 minutes on an H100/H200. The quantized
# linears' tests compile ~60 kernel configurations (fp32 and bf16, masked K tails, split and
# unsplit) and their bench rows ~10 more and time 40 GEMMs: not measured yet, 60 s and 45 s
# above the stages' earlier budgets.
declare -A budgets=([tests]=180 [kernels]=90 [throughput]=120)
[ $dry = 1 ] && budgets=([tests]=120 [kernels]=120 [throughput]=120)

record() {  # stage status seconds note
  printf '{"stage": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" \
    >> "$out/stages.jsonl"
}

echo "== env"
"$py" - > "$out/env.jsonl" <<'PY'
import json, platform
import torch, triton
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "triton": triton.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30
                  if cuda else None}))
PY
cat "$out/env.jsonl"

echo "== wheels"
export PYTHONPATH=$root
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=$(mktemp -d)/site
  start=$SECONDS
  if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "$wheels"/*.whl; then
    record wheels failed $((SECONDS - start)) "pip could not install $wheels"
    exit 1
  fi
  export PYTHONPATH=$site:$root
  if [ $dry = 1 ]; then  # hide this machine's copies of what the GPU image lacks
    export PYTHONPATH=$root/tests/gpu/dryrun:$PYTHONPATH TESSERA_WHEEL_SITE=$site
  fi
  # Every carried package imports from the wheel site, and so do the project's modules that
  # need them (in a dry run this machine's own copies are hidden, so a missing wheel fails here).
  if ! "$py" - "$site" <<'PY'
import importlib, pathlib, sys
site = pathlib.Path(sys.argv[1])
names = sorted(p.stem if p.suffix == ".py" else p.name for p in site.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")
for name in names:
    module = importlib.import_module(name)
    assert pathlib.Path(module.__file__).is_relative_to(site), f"{name} from {module.__file__}"
for name in ("server.api", "engine.llm", "engine.loader", "gguf", "zmq"):
    importlib.import_module(name)
print("imported from the wheels:", " ".join(names))
PY
  then
    record wheels failed $((SECONDS - start)) "a carried package does not import"
    exit 1
  fi
  record wheels ok $((SECONDS - start)) "$(ls "$wheels" | wc -l) wheels"
else
  echo "no $wheels/*.whl: using the installed packages"
  record wheels skipped 0 "no wheels in $wheels"
fi

run_stage() {  # name command...: run under the stage's budget, record how it ended
  local name=$1; shift
  local limit=${budget:-${budgets[$name]}} start=$SECONDS rc
  echo "== $name (budget ${limit}s): $*"
  timeout -k 10 "$limit" "$@"
  rc=$?
  local took=$((SECONDS - start))
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    record "$name" skipped $took "over its ${limit}s budget"
  elif [ $rc = 0 ]; then
    record "$name" ok $took ""
  else
    record "$name" failed $took "exit $rc"
  fi
}

tessera=("$py" -m server.cli)
if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1
  test_files=(tests/test_kernels_quant.py)
  kernels_args=(--tiny --dtype float32)
  throughput_args=(--device cpu --dtype float32 --model configs/tiny-llama --roofline
                   --num-prompts 4 --input-len 16 --output-len 8 --max-num-seqs 4)
else
  export TRITON_INTERPRET=0
  test_files=(tests/test_kernels.py tests/test_kernels_quant.py tests/test_triton_engine.py)
  kernels_args=()
  throughput_args=(--device cuda --dtype bfloat16 --model configs/llama3-8b --num-prompts 512
                   --input-len 512 --output-len 128 --max-num-seqs 512
                   --max-num-batched-tokens 8192)
fi

for stage in ${only//,/ }; do
  case $stage in
    tests) run_stage tests "$py" -m pytest -q -p no:cacheprovider --timeout 60 \
             --junitxml "$out/tests.xml" "${test_files[@]}" ;;
    kernels) run_stage kernels bash -c '"$@" > "$0"' "$out/kernels.jsonl" \
               "${tessera[@]}" bench kernels --json "${kernels_args[@]}" ;;
    throughput) run_stage throughput bash -c '"$@" > "$0"' "$out/throughput.jsonl" \
                  "${tessera[@]}" bench throughput --load-format dummy --json \
                  "${throughput_args[@]}" ;;
  esac
done

echo "== summary"
summary_args=("$out")
[ $dry = 1 ] && summary_args+=(--dry-run)
"$py" "$root/tests/gpu/summary.py" "${summary_args[@]}"
