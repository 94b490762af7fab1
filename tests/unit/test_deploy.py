"""deploy/: the manifests parse, fit together, keep their hardening, and carry a config the
gateway accepts; the README's onboarding commands parse with the real CLI."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.__main__ import COMMANDS
from sluicegate.cli import agent_env, ca, doctor
from sluicegate.config import load_config
from sluicegate.recording.chain import Signer
from tests.support.gateway import REPO

K8S = REPO / "deploy" / "k8s"
UNIT = REPO / "deploy" / "systemd" / "sluicegate.service"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert {"apiVersion", "kind"} <= doc.keys(), path
                docs.append(doc)
    return docs


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind]
    return doc


def test_every_manifest_is_yaml_and_listed_in_the_kustomization() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Kustomization", "Namespace", "NetworkPolicy",
         "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]
    )  # fmt: skip
    resources = one("Kustomization")["resources"]
    assert sorted(resources) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    for doc in documents():
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] in ("sluicegate", "agents")


def container() -> dict[str, Any]:
    (gateway,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return gateway


def option(name: str) -> str:
    args = container()["args"]
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def test_deployment_is_hardened_and_bounded() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    gateway = container()
    security = gateway["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= gateway["resources"]["limits"].keys()
    assert {"cpu", "memory"} <= gateway["resources"]["requests"].keys()
    paths = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in paths.items():
        assert gateway[probe]["httpGet"] == {"path": path, "port": "monitoring"}
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    config = yaml.safe_load(one("ConfigMap")["data"]["sluicegate.yaml"])
    assert config["monitoring"]["listen_host"] == "0.0.0.0"
    assert ports["monitoring"] == config["monitoring"]["listen_port"]


def test_service_reaches_the_proxy_and_base_url_ports_over_tcp() -> None:
    service_ports = {p["name"]: p for p in one("Service")["spec"]["ports"]}
    assert sorted(service_ports) == ["base-url", "proxy"]  # never monitoring
    for name in service_ports:
        (port,) = [p for p in container()["ports"] if p["name"] == name]
        service_port = service_ports[name]
        assert service_port["targetPort"] == name
        assert service_port["port"] == port["containerPort"]
        assert service_port["protocol"] == port["protocol"] == "TCP"
    assert (
        one("Service")["spec"]["selector"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert (
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
        == one("Service")["spec"]["selector"]
    )


def configmap_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(one("ConfigMap")["data"]["sluicegate.yaml"])
    return config


def selects(peer: dict[str, Any], namespace: str) -> bool:
    labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
    return bool(labels.get("kubernetes.io/metadata.name") == namespace)


def test_the_base_url_listener_is_on_the_ports_the_config_enables() -> None:
    """`base_url:` in the ConfigMap, the container port, the Service port and both network
    policies name the same port; the listener is on the pod IP, where the Service reaches it."""
    section = configmap_config()["base_url"]
    assert section["listen_host"] == "0.0.0.0"
    port = section["listen_port"]
    assert port == 8081  # the config's default, as in the docs
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["base-url"] == port
    (service_port,) = [p for p in one("Service")["spec"]["ports"] if p["name"] == "base-url"]
    assert service_port["port"] == port
    policies = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "NetworkPolicy"}
    agents_out = policies["agents-egress-through-sluicegate"]["spec"]["egress"]
    (to_gateway,) = [r for r in agents_out if any(selects(p, "sluicegate") for p in r["to"])]
    gateway_in = policies["sluicegate"]["spec"]["ingress"]
    (from_agents,) = [r for r in gateway_in if any(selects(p, "agents") for p in r["from"])]
    for rule in (to_gateway, from_agents):
        assert {"port": ports["proxy"], "protocol": "TCP"} in rule["ports"]
        assert {"port": port, "protocol": "TCP"} in rule["ports"]


def mounts() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """volume name -> (mount, volume)"""
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    return {m["name"]: (m, volumes[m["name"]]) for m in container()["volumeMounts"]}


def test_secrets_config_and_recordings_are_mounted_where_the_gateway_looks() -> None:
    by_name = mounts()
    ca_mount, ca_volume = by_name["ca"]
    assert ca_mount["mountPath"] == option("confdir") and ca_mount["readOnly"]
    assert ca_volume["secret"]["secretName"] == "sluicegate-ca"
    config_mount, config_volume = by_name["config"]
    config_path = Path(option("sluicegate_config"))
    assert config_mount["mountPath"] == str(config_path.parent)
    assert config_volume["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert config_path.name in one("ConfigMap")["data"]
    credentials, volume = by_name["credentials"]
    assert credentials["readOnly"] and volume["secret"]["secretName"] == "sluicegate-credentials"
    recordings, volume = by_name["recordings"]
    assert recordings["subPathExpr"] == "$(POD_NAME)"  # one gateway per recording directory
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == one("PersistentVolumeClaim")["metadata"]["name"]
    )
    env = {e["name"]: e for e in container()["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SLUICEGATE_CONFIG"]["value"] == str(config_path)


def test_the_configmap_config_is_valid_with_the_mounts(tmp_path: Path) -> None:
    """The gateway's own loader accepts the shipped config once the mounts exist; every secret
    it names lives in the credentials Secret's mount."""
    text = one("ConfigMap")["data"]["sluicegate.yaml"]
    by_name = mounts()
    secrets_dir = by_name["credentials"][0]["mountPath"]
    recordings_dir = by_name["recordings"][0]["mountPath"]
    files = set(re.findall(r"\{file: ([^}]+)\}", text))
    assert files and all(f.startswith(secrets_dir + "/") for f in files)
    assert yaml.safe_load(text)["recording"]["directory"] == recordings_dir

    local = tmp_path / "secrets"
    local.mkdir()
    for name in files:
        (local / Path(name).name).write_text("test-secret-value-0123456789abcdef\n")
    (local / "recording-signing.pem").write_bytes(Signer.generate().private_pem())
    text = text.replace(secrets_dir, str(local)).replace(recordings_dir, str(tmp_path / "rec"))
    text = text.replace("/app/rules", str(REPO / "rules"))
    (tmp_path / "sluicegate.yaml").write_text(text)
    config = load_config(tmp_path / "sluicegate.yaml")
    assert config.gateway.environment == "production"
    assert [r.name for r in config.routes] == ["openai", "anthropic"]
    assert config.base_url is not None
    assert dict(config.base_url.prefixes) == {"/openai": "openai", "/anthropic": "anthropic"}


def test_dockerfile_matches_the_deployment() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    assert (
        user
        and int(user.group(1))
        == one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    )
    assert "/app/addons/gateway.py" in dockerfile and "COPY rules ./rules" in dockerfile
    assert f"confdir={option('confdir')}" in dockerfile


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len(list(yaml.safe_load_all(done.stdout))) == len(documents()) - 1


# -- systemd --------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """key -> values (repeatable keys keep every value); continuation lines joined."""
    settings: dict[str, list[str]] = defaultdict(list)
    text = UNIT.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()].append(" ".join(value.split()))
    return settings


def test_systemd_unit_runs_the_gateway_hardened() -> None:
    s = unit_settings()
    (start,) = s["ExecStart"]
    argv = shlex.split(start)
    assert argv[0].endswith("/mitmdump")
    config = argv[argv.index("--set", argv.index("-s")) + 1].removeprefix("sluicegate_config=")
    assert argv[argv.index("-s") + 1].endswith("/addons/gateway.py")
    assert any(a.startswith("confdir=") for a in argv)
    assert s["ExecStartPre"] == [
        f"/opt/sluicegate/venv/bin/python -m sluicegate check-config {config}"
    ]
    assert s["User"] == ["sluicegate"]
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "RestrictNamespaces": "yes", "LockPersonality": "yes", "ProtectKernelTunables": "yes",
        "SystemCallArchitectures": "native", "UMask": "0077",
    }.items():  # fmt: skip
        assert s[key] == [value], key
    assert "@system-service" in s["SystemCallFilter"]
    assert s["StateDirectory"] and s["Restart"] == ["on-failure"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own parser accepts the unit (binaries swapped for ones that exist here)."""
    text = UNIT.read_text()
    text = text.replace("/opt/sluicegate/venv/bin/python", shutil.which("true") or "/bin/true")
    text = text.replace("/opt/sluicegate/venv/bin/mitmdump", shutil.which("true") or "/bin/true")
    text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.M)
    unit = tmp_path / "sluicegate.service"
    unit.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr and "Unknown lvalue" not in done.stderr


# -- README ---------------------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """Every `python -m sluicegate ...` line of the README's onboarding and deploying sections."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Onboarding an agent host") : text.index("## Recordings")]
    section = section.replace("\\\n", " ")
    commands = []
    for line in section.splitlines():
        line = line.strip()
        if line.startswith("python -m sluicegate "):
            line = re.sub(r"\[[^\]]*\]", "", line).split(">")[0]
            commands.append(shlex.split(line)[3:])
    return commands


def test_readme_onboarding_commands_parse() -> None:
    parsers = {
        "ca": ca.build_parser,
        "agent-env": agent_env.build_parser,
        "doctor": doctor.build_parser,
    }
    seen = set()
    for argv in readme_commands():
        assert argv[0] in COMMANDS
        if argv[0] in parsers:
            parsers[argv[0]]().parse_args(argv[1:])  # exits (SystemExit) if the README drifted
            seen.add(argv[0])
    assert seen == set(parsers)
