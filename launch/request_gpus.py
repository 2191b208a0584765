"""Bring an autoscaling cluster's GPU workers up before a run, or let them go after it.

    launch/submit.sh --wait --command "python launch/request_gpus.py" 16   # before `taskpgm run`
    launch/submit.sh --wait --command "python launch/request_gpus.py" 0    # after: idle GPU nodes may go

Every stage checks the cluster's GPUs when it starts (asking for more than the cluster has is an error,
not a hang), and a cluster whose GPU workers scale from zero has none until something asks. This asks:
it holds autoscaler demand for N one-GPU bundles (``ray.autoscaler.sdk.request_resources``, which
persists until the next call) and waits until the GPUs have joined. Cost: the GPU nodes run, and bill,
from now until the `0` call; the autoscaler's idle timeout does not remove them while the demand stands.
"""

import argparse
import time

import ray
from ray.autoscaler.sdk import request_resources


def main() -> None:
    """Request N GPUs (0 releases the request) and wait for them to join the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpus", type=int, help="GPUs to hold (0: release the request)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the GPUs (default 1800)")
    args = parser.parse_args()
    ray.init()
    request_resources(bundles=[{"GPU": 1}] * args.gpus)
    if args.gpus == 0:
        print("released the GPU request: idle GPU workers go after the idle timeout")
        return
    deadline = time.monotonic() + args.timeout
    while (have := ray.cluster_resources().get("GPU", 0)) < args.gpus:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {have:g} of {args.gpus} GPUs joined in {args.timeout:g} s; the request stands "
                             f"(check `ray status`, your GPU quota and max_workers)")
        print(f"{have:g}/{args.gpus} GPUs up; waiting", flush=True)
        time.sleep(15)
    print(f"{have:g} GPUs up; release them after the run: launch/request_gpus.py 0")


if __name__ == "__main__":
    main()
