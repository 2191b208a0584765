#!/usr/bin/env bash
# Export check: `taskpgm export` read back by the real tools (issue 23 item 8). Not part of CI or the tests.
#
#   benchmarks/export_check.sh            build the tools' virtualenvs (once), export a small mixture to every
#                                         format, and load each export through the tool's own code
#
# One virtualenv per tool, because their pins conflict (LLaMA-Factory 0.9.5 wants datasets<=4.0.0 and
# transformers<=5.6.0; axolotl 0.19.0 pins datasets==4.8.4 and transformers==5.16.1), under
# ${EXPORT_CHECK_VENV:-/tmp/taskpgm-export-check}/{llamafactory,megatron,axolotl}. Each gets the CPU build of
# torch 2.13.0 first (so nothing pulls a CUDA build), then this checkout (pip install -e, --no-deps: exporting
# needs only click, pyyaml, rich and numpy), then the tool. Installs are logged to <venv>/install.log and
# skipped when the venv's stamp matches. The mixture, its data and the exports are in $BASE/work.
#
# What each check reads back, and through which of the tool's functions, is printed; every weight read back
# is compared with the mixture's (see benchmarks/export_check.py). Exit status: the number of failed tools.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${EXPORT_CHECK_VENV:-/tmp/taskpgm-export-check}
PY=${PYTHON:-python3}
CHECK="$ROOT/benchmarks/export_check.py"
WORK="$BASE/work"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export DISABLE_VERSION_CHECK=1 LLAMAFACTORY_VERBOSITY=WARN HF_DATASETS_DISABLE_PROGRESS_BARS=1   # LLaMA-Factory: we pick its deps here, not its version gate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore::UserWarning   # megatron: "Transformer Engine and Apex are not installed"

TORCH="torch==2.13.0"
PROJECT_DEPS=(click pyyaml rich numpy)
LLAMAFACTORY="llamafactory==0.9.5"
# LLaMA-Factory's own pins (its METADATA), for what its data path imports; the tool itself goes in --no-deps,
# as the rest of its list (gradio, modelscope, torchaudio, torchvision, av, trl, ...) is for the web UI, media
# and training.
LLAMAFACTORY_DEPS=("transformers>=4.55.0,<=5.6.0,!=4.57.0" "datasets>=2.16.0,<=4.0.0" "accelerate>=1.3.0,<=1.11.0"
                   "peft>=0.18.0,<=0.18.1" "trl>=0.18.0,<=0.24.0" omegaconf "tyro<0.9.0" fire pydantic sentencepiece
                   tiktoken protobuf einops)
MEGATRON="megatron-core==0.16.1"  # with its deps: torch (already there), numpy, packaging
AXOLOTL="axolotl==0.19.0"
# axolotl's own pins (its METADATA) for its config schema and dataset loading; the tool itself goes in
# --no-deps: with its full dependency list (torch 2.13.0 CPU already installed), `pip install --dry-run
# axolotl==0.19.0` collects triton 3.9.0 (286 MB), bitsandbytes, xformers, torchao, lm_eval, modal, ... and then
# backtracks through gradio (its gradio==6.10.0 pin against trackio==0.19.0's gradio[oauth]>=6.8,<7: 23 gradio
# wheels of ~31 MB downloaded in turn); stopped after 10 minutes on this machine (2026-12-04).
AXOLOTL_DEPS=("transformers==5.16.1" "datasets==4.8.4" "accelerate==1.13.0" "peft==0.20.0" "trl==1.9.0"
              "pydantic==2.12.5" "huggingface_hub==1.17.0" "tokenizers==0.23.1" "packaging==26.0" addict fire
              colorama requests einops "numpy>=2.1,<3.0" scipy sentencepiece fastcore "typer==0.25.1"
              "python-dotenv==1.0.1" "zstandard==0.22.0" "optimum==1.16.2" "posthog==6.7.11" art
              "kernels>=0.16.0,<0.17.0" "axolotl-contribs-lgpl==0.0.7" "axolotl-contribs-mit==0.0.6" pillow "numba>=0.63.1,<1.0")

# make_venv NAME STEP... : each STEP is one pip install command line (words), run in order.
make_venv() {
  local name=$1; shift
  local dir="$BASE/$name" stamp
  stamp=$(printf '%s\n' "$TORCH" "$@" | sha256sum | cut -c1-16)
  if [ -f "$dir/.stamp-$stamp" ]; then
    echo "venv $name: ready ($dir)"
    return 0
  fi
  echo "venv $name: installing into $dir (log: $dir/install.log)"
  rm -rf "$dir" && "$PY" -m venv "$dir" || return 1
  : > "$dir/install.log"
  "$dir/bin/pip" install -q "$TORCH" >> "$dir/install.log" 2>&1 || { tail -20 "$dir/install.log"; return 1; }
  "$dir/bin/pip" install -q --no-deps -e "$ROOT" >> "$dir/install.log" 2>&1 || { tail -20 "$dir/install.log"; return 1; }
  "$dir/bin/pip" install -q "${PROJECT_DEPS[@]}" >> "$dir/install.log" 2>&1 || { tail -20 "$dir/install.log"; return 1; }
  local step
  for step in "$@"; do
    echo "  pip install $step" | tee -a "$dir/install.log"
    eval "\"\$dir/bin/pip\" install -q $step" >> "$dir/install.log" 2>&1 || { tail -30 "$dir/install.log"; return 1; }
  done
  touch "$dir/.stamp-$stamp"
}

quote_all() { local out="" a; for a in "$@"; do out+="'$a' "; done; echo "$out"; }

mkdir -p "$BASE"
echo "== taskpgm export check: $(date -u +%Y-%m-%dT%H:%M:%SZ), checkout $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- taskpgm_ray/mixture_file.py taskpgm_ray/cli.py || echo ' (mixture_file.py/cli.py modified in the working tree)'), $("$PY" --version)"
failed=0
declare -A RESULT INSTALL

make_venv llamafactory "--no-deps $LLAMAFACTORY" "$(quote_all "${LLAMAFACTORY_DEPS[@]}")" || INSTALL[llamafactory]="install failed"
make_venv megatron "$MEGATRON" || INSTALL[megatron]="install failed"
make_venv axolotl "--no-deps $AXOLOTL" "$(quote_all "${AXOLOTL_DEPS[@]}")" || INSTALL[axolotl]="install failed"

# The mixture, its data and the exports, made with the llamafactory venv's taskpgm (any venv would do).
EXPORTER="$BASE/llamafactory/bin"
[ -x "$EXPORTER/taskpgm" ] || EXPORTER="$BASE/megatron/bin"
rm -rf "$WORK" && mkdir -p "$WORK"
"$EXPORTER/python" "$CHECK" make "$WORK" || { echo "export_check: FAILED to make the mixture"; exit 99; }
echo
echo "== exports (taskpgm export, this checkout)"
run_export() {
  echo "\$ taskpgm export $*"
  (cd "$WORK" && "$EXPORTER/taskpgm" export "$@") 2>&1 | sed 's/^/  /'
  return "${PIPESTATUS[0]}"
}
run_export mixture.json --to llamafactory --names names_llamafactory.yaml --out data || failed=$((failed + 1))
run_export mixture.json --to llamafactory --names names_llamafactory.yaml --num-samples 5000 --out lf_5000 || failed=$((failed + 1))
run_export mixture.json --to axolotl --names names_axolotl.yaml --seed 7 --out mixture_axolotl.yaml || failed=$((failed + 1))
run_export mixture.json --to megatron --names names_megatron.yaml --mean-tokens mean_tokens.yaml --out megatron_data_args.txt || failed=$((failed + 1))
(cd "$WORK" && "$EXPORTER/taskpgm" export mixture.json --to megatron --names names_megatron.yaml \
   --mean-tokens mean_tokens.yaml > megatron_printed.txt) || failed=$((failed + 1))
run_export mixture.json --to hf --names names_hf.yaml --seed 3 --out mixture_hf.py || failed=$((failed + 1))
run_export mixture.json --to json --out mixture_weights.json || failed=$((failed + 1))

for tool in llamafactory megatron axolotl hf; do
  venv=$tool; [ "$tool" = hf ] && venv=llamafactory
  echo
  echo "== $tool"
  if [ -n "${INSTALL[$venv]:-}" ]; then
    echo "SKIPPED: $venv venv: ${INSTALL[$venv]} (see $BASE/$venv/install.log)"
    RESULT[$tool]="FAILED (${INSTALL[$venv]})"; failed=$((failed + 1)); continue
  fi
  if "$BASE/$venv/bin/python" "$CHECK" "$tool" "$WORK"; then
    RESULT[$tool]="ok"
  else
    RESULT[$tool]="FAILED"; failed=$((failed + 1))
  fi
done
echo
echo "== summary"
for tool in llamafactory megatron axolotl hf; do echo "$tool: ${RESULT[$tool]}"; done
exit "$failed"
