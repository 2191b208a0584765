#!/usr/bin/env bash
# Run `taskpgm run CONFIG ...` on a Ray cluster as a Ray job.
#
#   launch/submit.sh [--wait] [--address URL] [--command "taskpgm run"] CONFIG [taskpgm args...]
#
#   launch/submit.sh configs/test.yaml                    # submit, print the job id, return
#   launch/submit.sh --wait configs/test.yaml --output-dir /tmp/run1   # stream logs until the end
#   launch/submit.sh --command "taskpgm tasks list" configs/test.yaml  # another taskpgm command
#
# The cluster's job API is RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else http://127.0.0.1:8265
# (where `ray dashboard clusters/aws-gpu.yaml` or `kubectl port-forward` puts it).
# The repository is uploaded as the job's working directory (.git, .venv, runs/, data/, wandb/ left
# out), so the nodes run this checkout's code whether or not taskpgm_ray is installed there. Data and
# results do not travel with it: the upload is a temporary copy on the cluster, and data/ can be large.
# On a multi-node cluster put data files on the shared mount (/mnt/taskpgm/data, absolute paths in the
# config; or hub datasets) and the run's output_dir under /mnt/taskpgm (README "Run on a cluster").
#
# Authentication: RAY_AUTH_MODE=token with the cluster's token from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
# Job environment: WANDB_MODE (default offline); WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY and the
# variables named in TASKPGM_JOB_ENV (e.g. "HF_TOKEN") are passed only if set in your shell. They
# travel in the job's runtime_env (Ray's documented way: visible in the job's info to anyone holding
# the cluster token), never on a command line or on disk.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
command="taskpgm run"
wait=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wait) wait=1; shift ;;
        --address) [[ $# -ge 2 ]] || die "--address needs a URL"; address="$2"; shift 2 ;;
        --address=*) address="${1#*=}"; shift ;;
        --command) [[ $# -ge 2 ]] || die "--command needs a command"; command="$2"; shift 2 ;;
        --command=*) command="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG (e.g. configs/test.yaml)"; }

export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    die "no Ray auth token: put the cluster's token in ~/.ray/auth_token (clusters/*.yaml copy yours \
to the nodes; on KubeRay read it from the Secret, see launch/rayjob.yaml) or set RAY_AUTH_TOKEN_PATH"
fi

# The Python that has Ray: the one next to the `ray` command, unless PYTHON says otherwise.
ray_bin=$(command -v ray) || die "the ray command is not on PATH (pip install 'ray[default]')"
python="${PYTHON:-$(dirname "$ray_bin")/python}"
[[ -x "$python" ]] || python=python3

job_id="taskpgm-$(date -u +%Y%m%d-%H%M%S)-$RANDOM"

# The runtime env is built here, in memory, from this process's environment, and handed to
# `ray job submit` in-process: the W&B key is never written to disk nor put on a command line.
set +e
"$python" - "$address" "$job_id" "$wait" "$repo" "$command" "$@" <<'PY'
import json, os, shlex, sys

address, job_id, wait, repo, command, *args = sys.argv[1:]

env_vars = {
    "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
    "TOKENIZERS_PARALLELISM": "false",
}
# The job's runtime env reaches the driver and every worker (the driver's ray.init adds none of its own).
for name in ["WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
             "TRANSFORMERS_OFFLINE", *os.environ.get("TASKPGM_JOB_ENV", "").split()]:
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
runtime_env = {
    "env_vars": env_vars,
    # gitignore syntax, relative to the repository (.gitignore is honoured too).
    "excludes": ["/.git", "/.venv", "/runs", "/data", "/wandb", "__pycache__", "*.egg-info",
                 ".pytest_cache", ".ruff_cache", "/benchmarks/results"],
}

words = shlex.split(command) + args
if words and words[0] == "taskpgm":
    # `taskpgm` from the uploaded checkout: works on nodes where the package is not installed.
    words[:1] = ["python", "launch/taskpgm_entry.py"]

from ray.scripts.scripts import main  # noqa: E402

sys.argv = ["ray", "job", "submit", "--address", address, "--submission-id", job_id,
            "--working-dir", repo, "--runtime-env-json", json.dumps(runtime_env)]
sys.argv += [] if wait == "1" else ["--no-wait"]
sys.argv += ["--", *words]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code or 0
if wait == "1":
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        status = JobSubmissionClient(address).get_job_status(job_id)
    except Exception:  # the submission itself failed: `ray job submit` said why
        sys.exit(code or 1)
    print(f"Job {job_id}: {status.value}")
    sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
sys.exit(code)
PY
rc=$?
set -e
# A failed submission (rc != 0 without --wait) created no job: nothing to point at.
[[ $rc -eq 0 || $wait -eq 1 ]] || exit $rc

cat <<EOF

Job ID: $job_id   (cluster $address)
  follow logs: RAY_AUTH_MODE=token ray job logs --address $address --follow $job_id
  status:      RAY_AUTH_MODE=token ray job status --address $address $job_id
  stop:        RAY_AUTH_MODE=token ray job stop --address $address $job_id
EOF
exit $rc
