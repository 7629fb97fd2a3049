"""infra/: every manifest parses, every entry point names a real job with flags that job accepts, the Ray
versions agree with the one the project pins, and the image copies files that exist."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MANIFESTS = sorted(p for p in INFRA.rglob("*.yaml") if "stac-api" not in p.parts)
JOB_RE = re.compile(r"(?:^|/)jobs/(\w+)\.py$")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _job_parser(name: str):
    path = ROOT / "jobs" / f"{name}.py"
    assert path.is_file(), f"entry point names jobs/{name}.py, which does not exist"
    spec = importlib.util.spec_from_file_location(f"_infra_job_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parse_args


def _commands(text: str) -> list[list[str]]:
    """The `python .../jobs/X.py ARGS` invocations inside a shell command line (after `--` of ray job submit)."""
    words = shlex.split(text)
    out, cur = [], None
    for w in words:
        if JOB_RE.search(w):
            cur = [w]
            out.append(cur)
        elif cur is not None:
            if w in ("&&", ";", "|", "||"):
                cur = None
            else:
                cur.append(w)
    return out


def _entrypoints(doc: dict) -> list[str]:
    """Every command line in a manifest that starts a job."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind == "RayJob":
        return [spec["entrypoint"]]
    if kind == "RayCronJob":
        return [spec["jobTemplate"]["entrypoint"]]
    if kind == "CronJob":
        out = []
        for c in spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            out.append(" ".join(shlex.quote(x) for x in c.get("command", [])[2:]) + " " + " ".join(c.get("args", [])))
        return out
    return []


def _pinned_ray() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([\d.]+)\*?"', (ROOT / "pyproject.toml").read_text())
    return m.group(1).rstrip(".")


def test_every_manifest_parses_and_is_known():
    kinds = {}
    for p in MANIFESTS:
        docs = _docs(p)
        assert docs, f"{p} is empty"
        for d in docs:
            kinds.setdefault(d.get("kind", "cluster-launcher" if "cluster_name" in d else None), []).append(p.name)
    want = {"RayCluster", "RayJob", "RayCronJob", "CronJob", "PersistentVolumeClaim", "cluster-launcher"}
    assert want <= set(kinds), kinds
    assert len(kinds["RayJob"]) >= 2  # pretraining and inference


def test_entrypoints_name_real_jobs_and_real_flags():
    seen = set()
    for p in MANIFESTS:
        for d in _docs(p):
            for text in _entrypoints(d):
                cmds = _commands(text)
                assert cmds, f"{p.name}: entry point {text!r} starts no jobs/*.py"
                for cmd in cmds:
                    job = JOB_RE.search(cmd[0]).group(1)
                    parse = _job_parser(job)
                    try:
                        parse(cmd[1:])  # unknown flags, missing required ones or bad values exit here
                    except SystemExit as e:
                        pytest.fail(f"{p.name}: `{' '.join(cmd)}` is refused by jobs/{job}.py (exit {e.code})")
                    seen.add(job)
    assert {"pretrain", "infer", "refresh"} <= seen, seen


def test_a_wrong_flag_would_be_caught():
    """The check above can fail: a made-up flag is refused by the job's own parser."""
    parse = _job_parser("refresh")
    with pytest.raises(SystemExit):
        parse(["--product", "flood", "--catalog", "c", "--aoi", "a", "--state", "s", "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse(["--product", "crop", "--catalog", "c", "--aoi", "a"])  # --state missing


def test_ray_versions_match_the_pin():
    want = _pinned_ray()
    for p in MANIFESTS:
        for d in _docs(p):
            spec = d.get("spec", {})
            for cluster in (spec, spec.get("rayClusterSpec") or {}, (spec.get("jobTemplate") or {}).get(
                    "rayClusterSpec") or {}):
                if "rayVersion" in cluster:
                    assert cluster["rayVersion"].startswith(want), f"{p.name}: rayVersion {cluster['rayVersion']}"


def test_gpu_groups_request_gpus_and_tolerate_the_taint():
    for p in MANIFESTS:
        for d in _docs(p):
            spec = d.get("spec", {})
            for cluster in (spec, spec.get("rayClusterSpec") or {}):
                for g in cluster.get("workerGroupSpecs", []):
                    if g["groupName"] != "gpu":
                        continue
                    pod = g["template"]["spec"]
                    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1", p.name
                    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), p.name
                    assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], p.name


def test_cron_refresh_cannot_overlap():
    cron = [d for p in MANIFESTS for d in _docs(p) if d.get("kind") == "CronJob"]
    assert cron and all(d["spec"]["concurrencyPolicy"] == "Forbid" for d in cron)


def test_cluster_launcher_has_head_and_gpu_workers():
    (launcher,) = [d for p in MANIFESTS for d in _docs(p) if "cluster_name" in d]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert launcher["provider"]["type"] == "aws"


def test_dockerfile_copies_what_exists_and_installs_the_pinned_ray():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *srcs, _dst = line.split()
        for s in srcs:
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which does not exist"
    images = {c["image"] for p in MANIFESTS for d in _docs(p) for c in _containers(d)}
    assert len(images) == 1, f"one image for every pod, got {images}"


def _containers(doc: dict):
    def walk(o):
        if isinstance(o, dict):
            if "containers" in o and isinstance(o["containers"], list):
                yield from o["containers"]
            for v in o.values():
                yield from walk(v)
        elif isinstance(o, list):
            for v in o:
                yield from walk(v)

    yield from walk(doc)
    if "docker" in doc:
        yield {"image": doc["docker"]["image"]}


def _dicts(node, has):
    """Every dict anywhere inside a manifest that holds all the keys ``has``."""
    if isinstance(node, dict):
        if all(k in node for k in has):
            yield node
        for v in node.values():
            yield from _dicts(v, has)
    elif isinstance(node, list):
        for v in node:
            yield from _dicts(v, has)


def test_deployments_authenticate_and_local_runs_stay_on_loopback():
    """Anyone who reaches the dashboard of a cluster without auth runs code on it: every deployed container runs
    with Ray's token authentication (the token from a Kubernetes Secret), every RayCluster spec turns it on, a
    dashboard bound to 0.0.0.0 only comes with it, the launcher's dashboard stays on the head's loopback and the
    image does not switch auth off."""
    n = 0
    for p in MANIFESTS:
        for d in _docs(p):
            for c in (c for c in _containers(d) if "name" in c):  # pods (the launcher's image: checked below)
                env = {e["name"]: e for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{p.name}: {c['name']} {env}"
                assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], f"{p.name}: {c['name']}"
                n += 1
            for spec in _dicts(d, ("headGroupSpec",)):  # Ray cluster specs
                assert spec.get("authOptions", {}).get("mode") == "token", p.name
            assert "disabled" not in yaml.safe_dump(d).split("RAY_AUTH_MODE")[-1][:40], p.name
    assert n >= 5
    # every RayJob (a RayCronJob's job template too) names its submitter pod, and the submitter carries the token
    jobs = 0
    for p in MANIFESTS:
        for d in _docs(p):
            if d.get("kind") not in ("RayJob", "RayCronJob"):
                continue
            spec = d["spec"]["jobTemplate"] if d["kind"] == "RayCronJob" else d["spec"]
            first = spec["submitterPodTemplate"]["spec"]["containers"][0]
            env = {e["name"]: e for e in first.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert "command" not in first, f"{p.name}: KubeRay supplies the submitter's command from entrypoint"
            jobs += 1
    assert jobs == 3
    launcher = (INFRA / "cluster" / "aws-gpu.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in launcher and "0.0.0.0" not in launcher
    assert "--env-file" in launcher and "RAY_AUTH_MODE=disabled" not in launcher
    assert "RAY_AUTH_MODE=disabled" not in (INFRA / "docker" / "Dockerfile").read_text()
