"""A stack with a real node leaves nothing behind: not on Ctrl-C with its output piped to `tee`, and
not when its process is SIGKILLed (the janitor cleans up). Checked: processes, containers, mounts,
the node's network namespace and veth, host routes and iptables rules, cgroups, log links, the
run folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from modelapp_localstack.images import PAUSE_IMAGE
from modelapp_localstack.node import CONTAINER_LOG_LINKS, real_node_namespace_annotations

pytestmark = pytest.mark.pods

CLEANUP_SECONDS = 60


def _iptables_rules() -> str:
    """The host's rules without counters (kube-proxy's rules must never be here)."""
    saved = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    return "\n".join(line for line in saved.splitlines() if not line.startswith(("#", ":")))


def _leftovers(run_dir: Path, namespace: str) -> list[str]:
    index = namespace.rsplit("-", 1)[1]
    found = []
    if namespace in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split():
        found.append(f"network namespace {namespace}")
    if subprocess.run(["ip", "link", "show", f"mdl{index}"], capture_output=True, check=False).returncode == 0:
        found.append(f"link mdl{index}")
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=False).stdout
    found += [f"route {line}" for line in routes.splitlines() if f"10.244.{index}." in line]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if str(run_dir) in line]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmdline:
                found.append(f"process {entry.name}: {cmdline.replace(chr(0), ' ')[:120]}")
    found += [f"cgroup {path}" for path in Path("/sys/fs/cgroup").glob(f"*/modelapp-{index}")]
    if CONTAINER_LOG_LINKS.is_dir():
        found += [f"log link {link}" for link in CONTAINER_LOG_LINKS.iterdir()
                  if link.is_symlink() and str(run_dir) in os.readlink(link)]
    if run_dir.exists():
        found.append(f"run folder {run_dir}")
    return found


def _wait_clean(run_dir: Path, namespace: str) -> None:
    deadline = time.monotonic() + CLEANUP_SECONDS
    while (left := _leftovers(run_dir, namespace)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "left behind:\n" + "\n".join(left)


def _run_pause_pod(kubectl: list[str]) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "real", "annotations": real_node_namespace_annotations()}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": "real"},
           "spec": {"containers": [{"name": "sleeper", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}]}}
    for body in (namespace, pod):
        subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(body), text=True, check=True,
                       capture_output=True)
    subprocess.run([*kubectl, "wait", "--for=condition=Ready", "pod/sleeper", "-n", "real", "--timeout=90s"],
                   check=True, capture_output=True)


def test_ctrl_c_with_output_piped_to_tee_removes_everything(tmp_path: Path) -> None:
    rules_before = _iptables_rules()
    run_dir = tmp_path / "run"
    log = tmp_path / "up.log"
    command = (f"{sys.executable} -m modelapp_localstack up --only kube --real-node --nodes 1 "
               f"--run-dir {run_dir} 2>&1 | tee {log}")
    # Its own process group, like a terminal's foreground job: Ctrl-C reaches the stack and tee.
    shell = subprocess.Popen(["bash", "-c", command], start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while "running; press Ctrl-C" not in (text := log.read_text() if log.exists() else ""):
            assert shell.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.5)
        exports = {key: shlex.split(value)[0] for key, value in re.findall(r"^export (\w+)=(.+)$", text, re.MULTILINE)}
        kubectl = [*exports["MODELAPP_STACK_KUBECTL"].split(), f"--kubeconfig={exports['KUBECONFIG']}"]
        namespace = exports["MODELAPP_STACK_NODE_NETNS"]
        _run_pause_pod(kubectl)
        assert _leftovers(run_dir, namespace), "the stack should be running"
    finally:
        os.killpg(shell.pid, signal.SIGINT)
        shell.wait(timeout=120)
    _wait_clean(run_dir, namespace)
    assert _iptables_rules() == rules_before


def test_a_killed_stack_process_is_cleaned_up_by_its_janitor(tmp_path: Path) -> None:
    rules_before = _iptables_rules()
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from modelapp_localstack import Stack
        stack = Stack.create(Path({str(run_dir)!r}), real_nodes=1)
        kube = stack.start_kube(nodes=1)
        print(json.dumps({{"kubectl": [str(kube.binary), "kubectl", "--kubeconfig=" + str(kube.kubeconfig)],
                          "netns": stack.network.namespace}}), flush=True)
        time.sleep(3600)
    """)
    errors = tmp_path / "parent.log"
    with errors.open("w") as stderr:
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                  stderr=stderr, start_new_session=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, errors.read_text()
        started = json.loads(line)
        _run_pause_pod(started["kubectl"])
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if parent.stdout is not None:
            parent.stdout.close()
    _wait_clean(run_dir, started["netns"])
    assert _iptables_rules() == rules_before
