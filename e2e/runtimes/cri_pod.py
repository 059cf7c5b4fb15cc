"""A minimal CRI client: run, inspect, stop and remove a pod sandbox, as the kubelet
does. Usage: cri_pod.py SOCKET run NAME | stop ID | remove ID"""

import json
import sys

import grpc
from cri_api.v1 import api_pb2 as api
from cri_api.v1 import api_pb2_grpc as rpc


def main():
    sock, action, arg = sys.argv[1:4]
    runtime = rpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{sock}"))
    if action == "run":
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=arg, namespace="calyx-e2e", uid=f"uid-{arg}", attempt=0),
            hostname=arg,
            linux=api.LinuxPodSandboxConfig(),
        )
        sandbox = runtime.RunPodSandbox(api.RunPodSandboxRequest(config=config), timeout=60)
        status = runtime.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=sandbox.pod_sandbox_id), timeout=30
        )
        print(json.dumps({"id": sandbox.pod_sandbox_id, "ip": status.status.network.ip}))
    elif action == "stop":
        runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=arg), timeout=60)
    elif action == "remove":
        runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=arg), timeout=60)
    else:
        sys.exit(f"unknown action {action}")


if __name__ == "__main__":
    main()
