"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes started
with `ray start`, each node with its own temp dir, object store and resources; jobs go in
with `ray job submit`; a node is lost by SIGKILLing its whole process group.

Every node gets a custom resource `node_<name>` so the state API's node list tells them apart
(they share this machine's IP). Nothing here touches another Ray instance: no `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_ENV = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_V2_ENABLED": "1", "PYTHONUNBUFFERED": "1"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: str
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None


class RayCluster:
    """Head (no CPUs for work) plus worker nodes, all `ray start --block` process groups."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = {key: value for key, value in env.items() if key not in ("RAY_ADDRESS",)}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["RAY_AUTH_MODE"] = "token"
        self.nodes: dict[str, Node] = {}
        self.gcs, self.dashboard, self.client_server = free_ports(3)
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def _start(self, name: str, arguments: list[str], env: dict[str, str]) -> Node:
        # A short private temp dir per node: its sockets, logs and spilled objects stay its own.
        temp_dir = tempfile.mkdtemp(prefix=f"mga-{name}-", dir="/tmp")
        log = self.root / f"{name}.log"
        # Ports of its own: the defaults (e.g. the dashboard agent's 52365) collide between nodes on one machine.
        agent_http, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = free_ports(6)
        process = subprocess.Popen(
            [RAY, "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--object-store-memory=200000000",
             f"--resources={json.dumps({f'node_{name}': 1})}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
             f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}", *arguments],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        node = Node(name, process, temp_dir, log)
        self.nodes[name] = node
        return node

    def start_head(self) -> None:
        for attempt in range(3):  # a free port picked here may be taken by another process before Ray binds it
            if attempt:
                self.gcs, self.dashboard, self.client_server = free_ports(3)
                self.address = f"http://127.0.0.1:{self.dashboard}"
            head = self._start("head", ["--head", "--num-cpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                        f"--port={self.gcs}", f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={self.client_server}"], self.env)
            deadline = time.time() + 180
            while head.alive() and time.time() < deadline:  # until the job server answers (a 401 for want of a token counts)
                try:
                    urllib.request.urlopen(f"{self.address}/api/version", timeout=2).close()
                except urllib.error.HTTPError:
                    return
                except OSError:
                    time.sleep(1)
                    continue
                return
        raise AssertionError(head.log.read_text()[-3000:])

    def add_node(self, name: str, cpus: float = 2, env: dict[str, str] | None = None, wait: bool = True) -> Node:
        node = self._start(name, [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={cpus}"], env or self.env)
        if wait:
            self.wait_for(lambda nodes: name in nodes, f"node {name} to join")
        return node

    def kill(self, name: str) -> None:
        """Lose the node: SIGKILL its raylet and everything it started, at once."""
        node = self.nodes[name]
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def wait_for(self, condition, what: str, timeout: float = 120) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            nodes = self.alive_nodes()
            if condition(nodes):
                return nodes
            assert time.time() < deadline, f"timed out waiting for {what}: {nodes}"
            time.sleep(1)

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list <kind> --detail` as dicts (every page: limit 10,000)."""
        command = [RAY, "list", kind, "--address", self.address, "--format", "json", "--detail", "--limit", "10000"]
        for condition in filters:
            command += ["--filter", condition]
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return [] if done.stdout.startswith("No resource") else json.loads(done.stdout)

    def alive_nodes(self) -> dict[str, str]:
        """{node name: node id} of the alive nodes."""
        found = {}
        for node in self.state("nodes"):
            if node.get("state") == "ALIVE":
                names = [key[len("node_"):] for key in node.get("resources_total", {}) if key.startswith("node_")]
                found.update({name: node["node_id"] for name in names})
        return found

    def submit(self, argv: list[str], env: dict[str, str] | None = None, runtime_env: dict | None = None) -> subprocess.Popen:
        """`ray job submit -- python -m <argv>`, following its logs (stdout) until the job ends;
        the runtime env sets JOB_ENV's variables unless given."""
        runtime_env = runtime_env or {"env_vars": {**JOB_ENV, **(env or {})}}
        return subprocess.Popen(
            [RAY, "job", "submit", "--address", self.address, "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "-m", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=REPO,
        )

    def run(self, argv: list[str], timeout: float = 420, env: dict[str, str] | None = None) -> str:
        """Submit and wait; the job's logs. Fails the test when the job fails."""
        job = self.submit(argv, env)
        logs, _ = job.communicate(timeout=timeout)
        assert job.returncode == 0 and "succeeded" in logs, logs[-6000:]
        return logs

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            if node.alive():
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
                    try:
                        os.killpg(node.process.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        node.process.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        pass
            shutil.rmtree(node.temp_dir, ignore_errors=True)
