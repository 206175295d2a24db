"""`ray start --address ...` for a second Ray node on this same machine, every port on 127.0.0.1.

A one-machine stack runs Ray in its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which keeps every
address and port on loopback. Ray's CLI refuses to start a worker node in that mode, and with it off (=1) it
turns 127.0.0.1 into the machine's network address for the node, its GCS address and its agents, so the nodes
would talk over the network. This runs the same `ray start` CLI with only its refusal lifted: Ray's own
constants, read by the node's address resolution and by every process it starts, stay in single-machine mode.
Used by infra/local/start.sh (RAY_WORKER_CPUS) to give a test cluster a second node.

  python infra/local/join_node.py --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --num-cpus 1 ...
"""
import os
import sys
import types

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray._private.ray_constants as ray_constants  # noqa: E402
from ray.scripts import scripts  # noqa: E402

# the CLI module alone sees "multi-node allowed"; services (addresses) and the started processes do not
scripts.ray_constants = types.SimpleNamespace(**{**vars(ray_constants), "ENABLE_RAY_CLUSTER": True})

if __name__ == "__main__":
    sys.argv = ["ray", "start", *sys.argv[1:]]
    scripts.main()
