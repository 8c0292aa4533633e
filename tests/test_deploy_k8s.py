"""The Kubernetes manifests, offline: every overlay renders with `kubectl kustomize`, passes strict schema
validation (kubernetes-validate), and its parts refer to each other correctly (selectors, ports, mounted
files, the teacher address in the students' config); the RayService matches deploy/ray/serve.yaml.

No API server runs here, so the slow test replays the cpu-dev overlay under Docker instead: every container
of the rendered Deployment and Jobs runs from the same image with its rendered command, args, env (downward
API included), mounts (ConfigMaps and the Secret materialised as files, claims as shared directories), user,
read-only root and memory/CPU limits, on one network where Services are DNS aliases of the pods they select.
The teachers must pass their rendered gRPC probes on the rendered port, the student Jobs (torchrun, two pods
each) must finish against the headless Service, both jobs' ranks must show up in every teacher's /metrics,
and the teachers must drain on SIGTERM within their grace period. NetworkPolicy, PDB, HPA and RayService
cannot run without a cluster: they are checked structurally.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_compose import build_images, client_tokens, demo_assets, engine_problem, run

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
NAMESPACE = "atkd"
#: A conservative floor (what the manifests use, native gRPC probes and the batch.kubernetes.io/job-name label
#: among it, is in every release since 1.27) and the newest release whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CUSTOM_KINDS = {"RayService"}  # no schema offline: checked by test_rayservice
TEACHER = {"app.kubernetes.io/name": "atkd", "app.kubernetes.io/component": "teacher"}
STUDENT = {"app.kubernetes.io/name": "atkd", "app.kubernetes.io/component": "student"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to render the manifests")


# --- rendering ---------------------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(run(["kubectl", "kustomize", str(directory)]).stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay and deploy/k8s/ray rendered; the gpu overlay from a copy given the git-ignored token file."""
    copy_root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy_root)
    (copy_root / "overlays" / "gpu" / "token.secret").write_text("test-token\n")
    return {**{name: kustomize(copy_root / "overlays" / name) for name in OVERLAYS}, "ray": kustomize(K8S / "ray")}


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = find(objects, kind, name)
    return found


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def selects(selector: dict, labels: dict) -> bool:
    """A plain label selector (matchLabels, or a Service's map) against a pod's labels."""
    if "matchLabels" in selector:
        assert set(selector) == {"matchLabels"}, "matchExpressions are not handled here"
        selector = selector["matchLabels"]
    return all(labels.get(key) == value for key, value in selector.items())


def flag(args: list[str], name: str) -> str:
    """The value of ``--name=value`` in ``args`` (the manifests always use the ``=`` form)."""
    (value,) = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return value


def mounted_file(objects: list[dict], workload: dict, container: dict, path: str) -> str:
    """Contents of the ConfigMap or Secret key that ``path`` names inside ``container`` (fails if none does)."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    for mount in container["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(directory):
            continue
        volume, key = volumes[mount["name"]], path[len(directory):]
        if "configMap" in volume:
            return one(objects, "ConfigMap", volume["configMap"]["name"])["data"][key]
        if "secret" in volume:
            return base64.b64decode(one(objects, "Secret", volume["secret"]["secretName"])["data"][key]).decode()
    raise AssertionError(f"{path} is not a file of a ConfigMap or Secret mounted in {container['name']}")


def teacher_parts(objects: list[dict]) -> tuple[dict, dict]:
    deployment = one(objects, "Deployment", "atkd-teacher")
    (container,) = pod_spec(deployment)["containers"]
    return deployment, container


# --- fast: schema and structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*OVERLAYS, "ray"])
def test_rendered_manifests_pass_strict_schema_validation(rendered, name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    errors, custom = [], set()
    for obj in rendered[name]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                custom.add(obj["kind"])
            except kubernetes_validate.ValidationError as error:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {error.message} at "
                              f"{'.'.join(map(str, error.absolute_path))}")
    assert not errors, "\n".join(errors)
    assert custom <= CUSTOM_KINDS


def test_gpu_overlay_refuses_to_render_without_the_token_file(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "k8s" / "overlays" / "gpu" / "token.secret").unlink(missing_ok=True)
    result = run(["kubectl", "kustomize", str(tmp_path / "k8s" / "overlays" / "gpu")], check=False)
    assert result.returncode != 0 and "token.secret" in result.stderr


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_lives_in_the_namespace(rendered, name):
    objects = rendered[name]
    assert one(objects, "Namespace")["metadata"]["name"] == NAMESPACE
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {NAMESPACE}


@pytest.mark.parametrize("name", OVERLAYS)
def test_teacher_ports_probes_and_mounted_files_agree(rendered, name):
    objects = rendered[name]
    deployment, container = teacher_parts(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert int(flag(args, "port")) == ports["grpc"] and int(flag(args, "http-port")) == ports["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    # The config file and the token file are files of what is mounted there.
    teacher_config = yaml.safe_load(mounted_file(objects, deployment, container, flag(args, "config")))
    assert mounted_file(objects, deployment, container, flag(args, "auth-token-file")).strip()
    # The grace period covers preStop and the drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + teacher_config.get(
        "grace_s", 30) + 5
    # The model volume is read-only.
    models = [m for m in container["volumeMounts"] if flag(args, "model").startswith(m["mountPath"])]
    assert models and all(m.get("readOnly") for m in models)


@pytest.mark.parametrize("name", OVERLAYS)
def test_students_reach_the_teachers_through_the_headless_service(rendered, name):
    objects = rendered[name]
    _, teacher = teacher_parts(objects)
    grpc_port = {p["name"]: p["containerPort"] for p in teacher["ports"]}["grpc"]
    jobs = find(objects, "Job")
    assert len(jobs) >= 2, "several student Jobs share the teachers"
    addresses = set()
    for job in jobs:
        (container,) = pod_spec(job)["containers"]
        config = yaml.safe_load(mounted_file(objects, job, container, flag(container["args"], "config")))
        addresses.add(tuple(config["teacher"]["addresses"]))
        assert mounted_file(objects, job, container, config["teacher"]["token_file"]).strip()
    (shared,) = addresses
    (address,) = shared
    match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", address)
    assert match, address
    service = one(objects, "Service", match[1])
    assert match[2] == NAMESPACE and int(match[3]) == grpc_port
    # Headless: DNS gives the pods' own addresses, so the port is the container's, not a Service port.
    assert service["spec"]["clusterIP"] == "None" and selects(service["spec"]["selector"], TEACHER)


@pytest.mark.parametrize("name", OVERLAYS)
def test_student_jobs_are_indexed_torchrun_jobs(rendered, name):
    objects = rendered[name]
    for job in find(objects, "Job"):
        spec, pod = job["spec"], pod_spec(job)
        (container,) = pod["containers"]
        args = container["args"]
        assert container["command"] == ["torchrun"] and "--no-python" in args
        assert args[args.index("--no-python") + 1:][:2] == ["atkd-student", "train"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"] == int(flag(args, "nnodes"))
        assert flag(args, "node-rank") == "$(NODE_RANK)"
        assert flag(args, "master-addr") == f"$(JOB_NAME)-0.{pod['subdomain']}"
        assert flag(args, "output_dir") == "/checkpoints/$(JOB_NAME)"
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
        assert env == {"JOB_NAME": "metadata.labels['batch.kubernetes.io/job-name']",
                       "NODE_RANK": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
        rendezvous = one(objects, "Service", pod["subdomain"])
        assert rendezvous["spec"]["clusterIP"] == "None"
        assert selects(rendezvous["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
        port = int(flag(args, "master-port"))
        assert port in {p["containerPort"] for p in container["ports"]}
        assert port in {p["port"] for p in rendezvous["spec"]["ports"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models/student_init"]["readOnly"] and mounts["/data"]["readOnly"]
        assert "readOnly" not in mounts["/checkpoints"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policy_admits_only_students_to_the_grpc_port(rendered, name):
    objects = rendered[name]
    _, teacher = teacher_parts(objects)
    ports = {p["name"]: p["containerPort"] for p in teacher["ports"]}
    (policy,) = find(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], TEACHER) and policy["spec"]["policyTypes"] == ["Ingress"]
    pods = [pod["spec"]["template"]["metadata"]["labels"] for pod in find(objects, "Job") + find(objects, "Deployment")]
    for rule in policy["spec"]["ingress"]:
        (source,) = rule["from"]
        rule_ports = {p["port"] for p in rule["ports"]}
        if "podSelector" in source:  # in-namespace: the students, on gRPC only
            admitted = [labels for labels in pods if selects(source["podSelector"], labels)]
            assert admitted and all(labels == STUDENT for labels in admitted)
            assert rule_ports == {ports["grpc"]}
        else:  # Prometheus, from its namespace, on HTTP only
            assert set(source) == {"namespaceSelector"} and rule_ports == {ports["http"]}


@pytest.mark.parametrize("name", OVERLAYS)
def test_disruption_budget_and_autoscaler_target_the_teachers(rendered, name):
    objects = rendered[name]
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"], TEACHER)
    hpas = find(objects, "HorizontalPodAutoscaler")
    if name == "cpu-dev":  # no metrics adapter on a dev cluster: two fixed replicas instead
        assert not hpas and one(objects, "Deployment", "atkd-teacher")["spec"]["replicas"] == 2
        return
    (hpa,) = hpas
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "atkd-teacher"}
    assert "replicas" not in one(objects, "Deployment", "atkd-teacher")["spec"], "the HPA owns the count"
    (metric,) = hpa["spec"]["metrics"]
    # The metric is a per-pod gauge the teacher exports (the replay reads it off a live /metrics) and the
    # name prometheus-adapter serves it under.
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == queue_metric()
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == queue_metric() and rule["seriesQuery"].startswith(queue_metric() + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def queue_metric() -> str:
    """The teacher gauge the HPA scales on (named in the base's HPA)."""
    (metric,) = yaml.safe_load((K8S / "base" / "teacher-hpa.yaml").read_text())["spec"]["metrics"]
    return metric["pods"]["metric"]["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_are_locked_down_and_sized(rendered, name):
    for workload in find(rendered[name], "Deployment") + find(rendered[name], "Job"):
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                               "capabilities": {"drop": ["ALL"]}}
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]
            if name == "gpu":
                assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gpu_overlay_runs_the_containers_the_replay_runs(rendered):
    """The GPU pods cannot run here: they must differ from the replayed cpu-dev ones only in image, pull
    policy, resources, tolerations, the assets volume's source and the configs' contents."""

    def comparable(objects: list[dict]) -> dict:
        workloads = {}
        for workload in find(objects, "Deployment") + find(objects, "Job"):
            pod = copy.deepcopy(pod_spec(workload))
            pod.pop("tolerations", None)
            pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "assets"]
            for volume in pod["volumes"]:
                volume.get("configMap", {}).pop("name", None)  # hashed from contents
            for container in pod["containers"]:
                for key in ("image", "imagePullPolicy", "resources"):
                    container.pop(key, None)
            workloads[(workload["kind"], workload["metadata"]["name"])] = pod
        return workloads

    assert comparable(rendered["gpu"]) == comparable(rendered["cpu-dev"])


def test_rayservice(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    service = one(rendered["ray"], "RayService")
    assert service["apiVersion"] == "ray.io/v1" and service["metadata"]["namespace"] == NAMESPACE
    spec = service["spec"]
    assert set(spec) == {"serveConfigV2", "serveService", "rayClusterConfig"}
    serve = yaml.safe_load(spec["serveConfigV2"])
    assert serve == yaml.safe_load((REPO / "deploy" / "ray" / "serve.yaml").read_text())

    cluster = spec["rayClusterConfig"]
    assert set(cluster) == {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs"}
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert pinned == [f"ray[serve]=={cluster['rayVersion']}"], "the cluster runs the Ray the project pins"
    head, (workers,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert set(head) == {"rayStartParams", "template"}
    assert set(workers) == {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas go to the GPU workers
    # The embedded pod templates are ordinary pod specs: validate them as Pods.
    for group in (head, workers):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": group["template"]["spec"]}
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)

    (deployment,) = serve["applications"][0]["deployments"]
    (app,) = serve["applications"]
    (worker,) = workers["template"]["spec"]["containers"]
    gpus = deployment["ray_actor_options"]["num_gpus"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert workers["maxReplicas"] == deployment["autoscaling_config"]["max_replicas"]
    assert any(app["args"]["model"].startswith(m["mountPath"]) and m["readOnly"] for m in worker["volumeMounts"])
    proxy_ports = {"serve": serve["http_options"]["port"], "grpc": serve["grpc_options"]["port"]}
    assert {p["name"]: p["port"] for p in spec["serveService"]["spec"]["ports"]} == proxy_ports
    for group in (head, workers):  # proxy_location EveryNode: every pod runs both proxies
        (container,) = group["template"]["spec"]["containers"]
        assert proxy_ports.items() <= {p["name"]: p["containerPort"] for p in container["ports"]}.items()


# --- slow: the cpu-dev overlay's containers under Docker -----------------------------------------------------


class Replay:
    """Runs the pods of rendered manifests as Docker containers on one network (see the module docstring)."""

    def __init__(self, objects: list[dict], workdir: Path, host_paths: dict[str, Path]):
        self.objects, self.workdir, self.host_paths = objects, workdir, host_paths
        self.prefix = f"atkd-replay-{os.getpid()}"
        self.network = self.prefix
        self.containers: list[str] = []
        run(["docker", "network", "create", self.network])

    def close(self) -> None:
        if self.containers:
            run(["docker", "rm", "-f", *self.containers], check=False)
        run(["docker", "network", "rm", self.network], check=False)

    def logs(self, container: str) -> str:
        result = run(["docker", "logs", container], check=False)
        return result.stdout[-3000:] + result.stderr[-5000:]

    def start_pod(self, workload: dict, hostname: str, labels: dict, annotations: dict) -> str:
        """Start the pod's (single) container; returns the container's name."""
        pod = pod_spec(workload)
        (container,) = pod["containers"]
        meta = {"labels": labels, "annotations": annotations, "name": hostname, "namespace": NAMESPACE}
        env = {e["name"]: self.env_value(e, meta) for e in container.get("env", [])}
        command = [expand(part, env) for part in container.get("command", [])]
        args = [expand(part, env) for part in container.get("args", [])]
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        limits = container["resources"]["limits"]
        name = f"{self.prefix}-{hostname}"
        options = ["--detach", "--name", name, "--hostname", hostname, "--network", self.network,
                   "--user", f"{security['runAsUser']}:{security['runAsGroup']}",
                   "--group-add", str(security["fsGroup"]), "--memory", memory_bytes(limits["memory"]),
                   "--security-opt", "no-new-privileges"]
        if "cpu" in limits:
            options += ["--cpus", str(cpu_cores(limits["cpu"]))]
        if security.get("readOnlyRootFilesystem"):
            options.append("--read-only")
        if security.get("capabilities", {}).get("drop") == ["ALL"]:
            options += ["--cap-drop", "ALL"]
        for alias in self.dns_names(labels, hostname, pod.get("subdomain")):
            options += ["--network-alias", alias]
        for key, value in env.items():
            options += ["--env", f"{key}={value}"]
        options += self.mounts(pod, container)
        if command:
            options += ["--entrypoint", command[0]]
        image = container["image"]
        run(["docker", "run", *options, image, *command[1:], *args])
        self.containers.append(name)
        return name

    def env_value(self, entry: dict, meta: dict) -> str:
        if "value" in entry:
            return entry["value"]
        path = entry["valueFrom"]["fieldRef"]["fieldPath"]  # only the downward API is used
        if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return meta[match[1]][match[2]]
        return meta[path.removeprefix("metadata.")]

    def dns_names(self, labels: dict, hostname: str, subdomain: str | None) -> list[str]:
        """The names cluster DNS would give this pod: of each Service selecting it, and its own."""
        names = []
        for service in find(self.objects, "Service"):
            if selects(service["spec"]["selector"], labels):
                base = service["metadata"]["name"]
                names += [base, f"{base}.{NAMESPACE}", f"{base}.{NAMESPACE}.svc.cluster.local"]
                if subdomain == base:
                    names += [f"{hostname}.{base}", f"{hostname}.{base}.{NAMESPACE}.svc.cluster.local"]
        return names

    def mounts(self, pod: dict, container: dict) -> list[str]:
        fs_group = pod["securityContext"]["fsGroup"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        options = []
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                options += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
                continue
            source = self.volume_dir(volume, fs_group) / mount.get("subPath", "")
            assert source.exists(), f"{mount['mountPath']}: {source} does not exist"
            options += ["--volume", f"{source}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
        return options

    def volume_dir(self, volume: dict, fs_group: int) -> Path:
        """A host directory with the volume's contents, owned as kubelet would own it."""
        if "hostPath" in volume:
            return self.host_paths[volume["hostPath"]["path"]]
        if "persistentVolumeClaim" in volume:  # one directory per claim, shared by every pod using it
            one(self.objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            directory = self.workdir / "claims" / volume["persistentVolumeClaim"]["claimName"]
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, 0, fs_group)
            directory.chmod(0o2775)
            return directory
        kind, source = ("ConfigMap", volume["configMap"]) if "configMap" in volume else ("Secret", volume["secret"])
        name = source.get("name") or source["secretName"]
        directory = self.workdir / kind / name
        if not directory.exists():
            directory.mkdir(parents=True)
            obj = one(self.objects, kind, name)
            for key, value in obj["data"].items():
                path = directory / key
                path.write_bytes(base64.b64decode(value) if kind == "Secret" else value.encode())
                os.chown(path, 0, fs_group)
                path.chmod(source.get("defaultMode", 0o644))
        return directory

    def address(self, container: str) -> str:
        return run(["docker", "inspect", "--format",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container]).stdout.strip()

    def wait_for_probe(self, container: str, probe: dict, timeout_s: float) -> None:
        """Poll a gRPC probe from the host (as kubelet does) until it passes; fail with the logs after
        ``timeout_s`` (the probe's own budget)."""
        from grpc_health.v1 import health_pb2

        deadline = time.monotonic() + timeout_s
        target = f"{self.address(container)}:{probe['grpc']['port']}"
        while True:
            status = grpc_health(target, probe["grpc"].get("service", ""))
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            running = run(["docker", "inspect", "--format", "{{.State.Running}}", container]).stdout.strip()
            if running != "true":  # kubelet would restart it, and again: CrashLoopBackOff
                raise AssertionError(f"{container} exited before its probe passed\n" + self.logs(container))
            if time.monotonic() > deadline:
                raise AssertionError(f"{container}: probe on {target} failed ({status}) for {timeout_s:.0f} s\n"
                                     + self.logs(container))
            time.sleep(probe.get("periodSeconds", 10))


def grpc_health(target: str, service: str):
    """The health status of ``service`` at ``target``, or the error code's name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status
    except grpc.RpcError as error:
        return error.code().name


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args ($$ escapes; unknown names stay as written)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def memory_bytes(quantity: str) -> str:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity).groups()
    return str(int(number) * units.get(unit, 1))


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.slow
def test_cpu_dev_overlay_runs_under_docker(rendered, tmp_path, pytestconfig):
    if problem := engine_problem():
        pytest.skip(problem)
    if os.geteuid() != 0:
        pytest.skip("materialising volumes with kubelet's ownership needs root")
    objects = rendered["cpu-dev"]
    build_images()
    assets = demo_assets(pytestconfig, tmp_path / "assets")
    (hostpath,) = {v["hostPath"]["path"] for w in find(objects, "Deployment") + find(objects, "Job")
                   for v in pod_spec(w)["volumes"] if "hostPath" in v}
    replay = Replay(objects, tmp_path / "volumes", {hostpath: assets})
    try:
        deployment, container = teacher_parts(objects)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        scrape = deployment["spec"]["template"]["metadata"]["annotations"]  # prometheus.io/port, path
        teachers = [replay.start_pod(deployment, f"atkd-teacher-{i}", labels, {})
                    for i in range(deployment["spec"]["replicas"])]
        for name in teachers:
            startup = container["startupProbe"]
            replay.wait_for_probe(name, startup, startup["periodSeconds"] * startup["failureThreshold"])
            for probe in ("readinessProbe", "livenessProbe"):
                replay.wait_for_probe(name, container[probe], 0)
            # The HPA's metric (gpu overlay) is on the page Prometheus scrapes.
            url = f"http://{replay.address(name)}:{scrape['prometheus.io/port']}{scrape['prometheus.io/path']}"
            assert re.search(rf"^{queue_metric()} ", urllib.request.urlopen(url, timeout=10).read().decode(), re.M)

        students, expected_clients = [], set()
        for job in find(objects, "Job"):
            job_name = job["metadata"]["name"]
            (student,) = pod_spec(job)["containers"]
            ranks = job["spec"]["completions"] * int(flag(student["args"], "nproc-per-node"))
            expected_clients |= {f"{job_name}-rank{rank}" for rank in range(ranks)}
            for index in range(job["spec"]["completions"]):
                labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-name": job_name}
                annotations = {"batch.kubernetes.io/job-completion-index": str(index)}
                students.append(replay.start_pod(job, f"{job_name}-{index}", labels, annotations))
        for name in students:
            code = int(run(["docker", "wait", name], timeout=900).stdout)
            assert code == 0, f"{name} exited {code}\n{replay.logs(name)}"
        for job in find(objects, "Job"):
            final = tmp_path / "volumes" / "claims" / "atkd-checkpoints" / job["metadata"]["name"] / "final"
            assert (final / "model.safetensors").is_file(), f"no final model in {final}"

        # Every teacher computed tokens for every rank of both jobs: the jobs share the replicas.
        for name in teachers:
            url = f"http://{replay.address(name)}:{scrape['prometheus.io/port']}{scrape['prometheus.io/path']}"
            seen = client_tokens(urllib.request.urlopen(url, timeout=10).read().decode())
            assert set(seen) == expected_clients, (name, seen)

        # preStop's command exists in the image; SIGTERM drains within terminationGracePeriodSeconds.
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        run(["docker", "exec", teachers[0], *container["lifecycle"]["preStop"]["exec"]["command"]])
        start = time.monotonic()
        run(["docker", "stop", "--time", str(grace), *teachers], timeout=grace + 30)
        assert time.monotonic() - start < grace
        for name in teachers:
            state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", name]).stdout)
            assert state["ExitCode"] == 0 and "atkd-teacher stopped" in replay.logs(name)
    finally:
        replay.close()

