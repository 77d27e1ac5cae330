#!/usr/bin/env python3
"""What the shared remote costs a no-op run (docs/performance.md, "The remote").

    remote.py KKPIPE VENV_BIN WORK [--runs N] [--store weed|moto|gcs|file|git]

Copies the KKP demo repository (fixtures/kkp-demo with the pipeline `kkpipe demo` gives it and the demo's
stand-in environment) to WORK/remote-demo, starts the store on loopback (SeaweedFS `VENV_BIN/weed server -s3`, moto's
`VENV_BIN/moto_server`, fake-gcs-server `VENV_BIN/fake-gcs-server` for `gs://`, `git daemon --enable=receive-pack`
for a `git:` store, or a `file://` directory), runs the push pipeline once with the remote (writing its
entries and ledger), then times no-op push runs with the remote and with `KKPIPE_REMOTE=off`, alternately, and
prints the medians and their difference. The issue's budget: at most 20 ms more with the remote.
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import json

KKPIPE, BIN, WORK = (os.path.abspath(a) for a in sys.argv[1:4])
# An older form named the weed binary itself.
BIN = os.path.dirname(BIN) if os.path.basename(BIN) == "weed" else BIN
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 15
STORE = sys.argv[sys.argv.index("--store") + 1] if "--store" in sys.argv else "weed"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_weed(data):
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    ports = [port() for _ in range(8)]
    s3 = ports[7]
    args = [os.path.join(BIN, "weed"), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", f"-volume.port={ports[2]}",
            f"-volume.port.grpc={ports[3]}", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
            f"-filer.localSocket={data}/filer.sock", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={ports[6]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-volume.max=10"]
    return wait_for(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), s3, "SeaweedFS")


def start_moto():
    s3 = port()
    proc = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(s3)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_for(proc, s3, "moto")


def start_gcs():
    p = port()
    proc = subprocess.Popen([os.path.join(BIN, "fake-gcs-server"), "-scheme", "http", "-host", "127.0.0.1",
                             "-port", str(p), "-backend", "memory", "-public-host", f"127.0.0.1:{p}",
                             "-log-level", "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{p}"
    for _ in range(100):
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                            f"{endpoint}/storage/v1/b", "-d", '{"name": "bench"}'], capture_output=True, text=True)
        if r.stdout in ("200", "409"):
            return proc, endpoint
        time.sleep(0.1)
    proc.kill()
    sys.exit("fake-gcs-server did not start")


def start_git(base):
    """git-daemon itself (`git daemon` is a parent that would outlive a kill), serving base/demo.git."""
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    subprocess.run(["git", "init", "-q", "--bare", os.path.join(base, "demo.git")], check=True)
    p = port()
    exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.Popen([os.path.join(exec_path, "git-daemon"), "--reuseaddr", "--export-all",
                             "--enable=receive-pack", "--listen=127.0.0.1", f"--port={p}", f"--base-path={base}",
                             base], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                return proc, f"git://127.0.0.1:{p}/demo.git"
        time.sleep(0.1)
    proc.kill()
    sys.exit("git daemon did not start")


def wait_for(proc, s3, name):
    endpoint = f"http://127.0.0.1:{s3}"
    for _ in range(120):
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", f"{endpoint}/bench"],
                           capture_output=True, text=True)
        if r.stdout in ("200", "409"):
            return proc, endpoint
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"{name} did not start")


def demo_env(repo):
    env = dict(os.environ)
    for line in open(os.path.join(repo, "demo.env")):
        if line.startswith("export "):
            k, v = line[len("export "):].strip().split("=", 1)
            env[k] = v.strip('"').replace("$KKP_DEMO_DIR", repo).replace("$PATH", os.environ["PATH"])
    return env


def main():
    repo = os.path.join(WORK, "remote-demo")
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "fixtures", "kkp-demo"), repo, symlinks=True)
    # The pipeline `kkpipe demo` gives it: init reads the versions the wizard's files pin.
    subprocess.run([KKPIPE, "init", "--ci", "github", "--cloud", "aws", "--dns", "--force"], cwd=repo, check=True,
                   capture_output=True)
    keys = json.loads(subprocess.run([KKPIPE, "remote", "keygen", "--json"], capture_output=True, check=True).stdout)
    store_dir = os.path.join(WORK, "remote-store")
    shutil.rmtree(store_dir, ignore_errors=True)
    server, endpoint = {"weed": lambda: start_weed(os.path.join(WORK, "remote-weed")), "moto": start_moto,
                        "git": lambda: start_git(os.path.join(WORK, "remote-git")), "gcs": start_gcs,
                        "file": lambda: (None, None)}[STORE]()
    url = {"file": f"file://{store_dir}", "git": f"git:{endpoint}", "gcs": "gs://bench/demo"}.get(STORE, "s3://bench/demo")
    with open(os.path.join(repo, "pipeline.toml"), "a") as f:
        f.write(f'\n[remote]\nurl = "{url}"\ntrusted_keys = ["{keys["public"]}"]\n')
    try:
        env = demo_env(repo)
        env.update(KKPIPE_SIGNING_KEY=keys["private"])
        if STORE == "gcs":
            env.update(GOOGLE_BASE_URL=endpoint, GOOGLE_BEARER_TOKEN="bench")
        elif endpoint and STORE != "git":
            env.update(AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true", AWS_ACCESS_KEY_ID="bench",
                       AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
        # --no-verify: the deploy stages' drift probes (terraform plan) would dwarf what is measured here.
        cmd = [KKPIPE, "run", "-q", "--yes", "--no-verify", "--event", "push", "--branch", "main"]
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        time.sleep(2.5)  # past the stat cache's racy window
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
        off = dict(env, KKPIPE_REMOTE="off")
        with_remote, without = [], []
        for _ in range(RUNS):
            for sample, e in ((with_remote, env), (without, off)):
                t = time.perf_counter()
                r = subprocess.run(cmd, cwd=repo, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                sample.append((time.perf_counter() - t) * 1000)
                if r.returncode != 0 or "warning" in r.stderr:
                    sys.exit(f"the no-op run failed or warned:\n{r.stderr}")
        a, b = statistics.median(with_remote), statistics.median(without)
        print(f"no-op push run of the KKP demo, {RUNS} runs each, alternating")
        print(f"  without a remote: {b:7.1f} ms (median)")
        print(f"  with {STORE + ':':<13}{a:7.1f} ms (median)")
        print(f"  difference:       {a - b:+7.1f} ms (budget +20 ms)")
    finally:
        if server:
            server.kill()


main()
