#!/usr/bin/env python3
"""Checks the deploy kit against a live gateway: promtool on a real scrape and on the alert rules
(and their unit tests), every metric the dashboard and the alerts query exists in that scrape, the
manifests parse, the ConfigMaps' gateway.toml pass check-config, both Kubernetes variants render
(kubectl kustomize) with what single-process and fleet mode need, and the fleet's Compose file and
Redis settings hold (statically: no Docker here). Usage: check.py PATH_TO_BINARY"""
import json, os, re, shutil, ssl, subprocess, sys, tempfile, time, tomllib, urllib.parse, urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
binary = os.path.abspath(sys.argv[1])
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def run(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def start(args, env=None, marker=None):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 30
    stream = p.stdout if marker == "stdout" else p.stderr
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        yield_line = line.strip()
        if marker == "stdout" and yield_line.startswith("thingspace simulator listening on"):
            return p, yield_line.rsplit(" ", 1)[1]
        if marker == "stderr" and "thingspace-gateway serving" in yield_line:
            fields = json.loads(yield_line)["fields"]
            return p, (fields["listen"], fields["admin"])
    p.kill()
    raise SystemExit(f"{args} did not start")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


# Manifests parse: the single-process kit (kubernetes/single) and the fleet overlay
# (kubernetes/fleet), patches and kustomizations included.
K8S = os.path.join(HERE, "kubernetes")
for root, _, files in sorted(os.walk(K8S)):
    for name in sorted(f for f in files if f.endswith((".yaml", ".yml"))):
        rel = os.path.relpath(os.path.join(root, name), HERE)
        with open(os.path.join(root, name)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        check(docs and all("kind" in d and "apiVersion" in d for d in docs), f"{rel} parses ({len(docs)} objects)")


def check_config(toml_text, env_extra, what):
    """check-config on `toml_text` with only `env_extra` of the THINGSPACE_* environment."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as t:
        t.write(toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THINGSPACE")}
    env.update(env_extra)
    r = run(binary, "check-config", "--config", t.name, env=env)
    os.unlink(t.name)
    check(r.returncode == 0, f"{what} passes check-config " + r.stderr.strip())
    return r.returncode == 0


# The ConfigMaps' configs are valid: the single-process one as it is, the fleet one with the
# Secret's Redis URL and token key (placeholders here: check-config does not connect).
with open(os.path.join(K8S, "single", "configmap.yaml")) as f:
    single_toml = yaml.safe_load(f)["data"]["gateway.toml"]
check_config(single_toml, {}, "kubernetes/single/configmap.yaml gateway.toml")
with open(os.path.join(K8S, "fleet", "configmap-patch.yaml")) as f:
    fleet_toml = yaml.safe_load(f)["data"]["gateway.toml"]
CHECK_KEY = "check-py-token-key-0123456789abcdef0123"
check_config(fleet_toml, {
    "THINGSPACE_GATEWAY_REDIS__URL": "redis://:check-password@thingspace-gateway-redis:6379/0",
    "THINGSPACE_GATEWAY_TOKEN_KEY": CHECK_KEY,
}, "kubernetes/fleet/configmap-patch.yaml gateway.toml (fleet mode)")
fleet_cfg = tomllib.loads(fleet_toml)
check(fleet_cfg["credentials"].get("guard_file") == "", "fleet config: guard_file \"\" (the counts live in Redis)")


def redis_settings(args, what, password=None):
    """Starts redis-server with `args` (on a unix socket in a temp dir, no TCP port) and returns
    CONFIG GET of the settings fleet mode depends on, or None if it refused the arguments."""
    if not shutil.which("redis-server"):
        check(False, f"{what}: redis-server is not installed (apt-get install redis-server)")
        return None
    d = tempfile.mkdtemp(prefix="tsgw-check-redis-")
    sock = os.path.join(d, "redis.sock")
    kept, i = [], 0
    while i < len(args):  # the data directory and port are ours
        if args[i] in ("--dir", "--port", "--bind", "--unixsocket"):
            i += 2
            continue
        kept.append(args[i])
        i += 1
    p = subprocess.Popen(["redis-server", *kept, "--port", "0", "--unixsocket", sock, "--dir", d],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env = dict(os.environ)
    if password:
        env["REDISCLI_AUTH"] = password
    try:
        deadline = time.time() + 10
        while not os.path.exists(sock) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not os.path.exists(sock):
            p.kill()
            out = p.communicate()[0]
            check(False, f"{what}: redis-server refused its arguments: {out.strip()[-300:]}")
            return None
        got = {}
        for key in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory", "requirepass"):
            r = run("redis-cli", "-s", sock, "--no-auth-warning", "CONFIG", "GET", key, env=env)
            lines = r.stdout.splitlines()
            got[key] = lines[1] if len(lines) > 1 else None
        return got
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


def check_redis(args, what, password, url_password=None):
    got = redis_settings(args, what, password)
    if got is None:
        return
    policy = got["maxmemory-policy"] or ""
    check(got["appendonly"] == "yes" and got["appendfsync"] == "everysec",
          f"{what}: AOF on, appendfsync everysec (the login counts survive a Redis restart)")
    check(policy == "noeviction" or policy.startswith("volatile-"),
          f"{what}: maxmemory-policy {policy} never evicts keys without an expiry (the login counts)")
    if url_password is not None:
        check(got["requirepass"] == url_password, f"{what}: requirepass is the password in the gateways' redis.url")


# The fleet's Redis StatefulSet: the arguments redis-server really accepts, with the settings
# fleet mode needs; only the gateway's pods may reach it.
with open(os.path.join(K8S, "fleet", "redis.yaml")) as f:
    redis_docs = [d for d in yaml.safe_load_all(f) if d]
sts = next(d for d in redis_docs if d["kind"] == "StatefulSet")
ctr = sts["spec"]["template"]["spec"]["containers"][0]
check(sts["spec"]["replicas"] == 1 and ctr["command"] == ["redis-server"], "fleet redis: one standalone redis-server")
check_redis([a.replace("$(REDIS_PASSWORD)", "check-password") for a in ctr["args"]],
            "kubernetes/fleet/redis.yaml", "check-password")
check(any(m["mountPath"] == "/data" for m in ctr["volumeMounts"]) and sts["spec"].get("volumeClaimTemplates"),
      "fleet redis: /data on a PersistentVolumeClaim")
redis_labels = sts["spec"]["template"]["metadata"]["labels"]
netpol = next(d for d in redis_docs if d["kind"] == "NetworkPolicy")
froms = [peer for rule in netpol["spec"]["ingress"] for peer in rule["from"]]
check(netpol["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
      and froms == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "thingspace-gateway"}}}]
      and "Ingress" in netpol["spec"]["policyTypes"],
      "fleet redis: the NetworkPolicy admits only the gateway's pods")
check(redis_labels.get("app.kubernetes.io/name") != "thingspace-gateway",
      "fleet redis: its pods are not selected by the gateway's Services, PDB and policy")


def kustomize(d):
    r = run("kubectl", "kustomize", os.path.join(K8S, d))
    check(r.returncode == 0, f"kubectl kustomize kubernetes/{d} " + r.stderr.strip()[-300:])
    return [o for o in yaml.safe_load_all(r.stdout) if o] if r.returncode == 0 else []


def obj(objs, kind, name):
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def secret_refs(deploy):
    return {e["valueFrom"]["secretKeyRef"]["key"]: e["name"]
            for c in deploy["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


# Both variants as kubectl would apply them (kustomize is built into kubectl).
if shutil.which("kubectl"):
    single, fleet = kustomize("single"), kustomize("fleet")
    d1, dn = obj(single, "Deployment", "thingspace-gateway"), obj(fleet, "Deployment", "thingspace-gateway")
    if d1 and dn:
        check(d1["spec"]["replicas"] == 1 and d1["spec"]["strategy"]["type"] == "Recreate"
              and obj(single, "PersistentVolumeClaim", "thingspace-gateway-state"),
              "single: one replica, Recreate, the guard file on a volume")
        surge = dn["spec"]["strategy"].get("rollingUpdate", {}).get("maxSurge", 0)
        check(dn["spec"]["replicas"] >= 2 and dn["spec"]["strategy"]["type"] == "RollingUpdate"
              and isinstance(surge, int)
              and dn["spec"]["replicas"] + surge <= fleet_cfg["redis"]["max_replicas"],
              f"fleet: {dn['spec']['replicas']} replicas, RollingUpdate, replicas + maxSurge ({surge}) "
              f"<= redis.max_replicas ({fleet_cfg['redis']['max_replicas']})")
        refs = secret_refs(dn)
        check(refs.get("redis-url") == "THINGSPACE_GATEWAY_REDIS__URL" and refs.get("token-key") == "THINGSPACE_GATEWAY_TOKEN_KEY",
              "fleet: Redis URL and the shared token key from the Secret")
        spec = dn["spec"]["template"]["spec"]
        check(not obj(fleet, "PersistentVolumeClaim", "thingspace-gateway-state")
              and all("persistentVolumeClaim" not in v for v in spec.get("volumes", [])),
              "fleet: no guard-file volume")
        cm = obj(fleet, "ConfigMap", "thingspace-gateway")
        check(cm and cm["data"]["gateway.toml"] == fleet_toml, "fleet: the ConfigMap carries the fleet gateway.toml")
        for variant, objs, dep in (("single", single, d1), ("fleet", fleet, dn)):
            with open(os.path.join(K8S, variant, "secret.example.yaml")) as f:
                example = yaml.safe_load(f)["stringData"]
            used = set(secret_refs(dep))
            for o in objs:
                if o["kind"] == "StatefulSet":
                    used |= set(secret_refs(o))
            check(used <= set(example), f"{variant}: every Secret key the pods use is in secret.example.yaml; missing {sorted(used - set(example))}")
        check(obj(fleet, "StatefulSet", "thingspace-gateway-redis") and obj(fleet, "Service", "thingspace-gateway-redis"),
              "fleet: Redis StatefulSet and Service rendered")
else:
    print("skip kubectl kustomize (kubectl is not installed): the rendered variants are not checked")
# The fleet demo for Docker Compose (no Docker here: checked statically, the configs by the
# binary, the Redis flags by a real redis-server, the simulator's certificate by the simulator).
COMPOSE = os.path.join(HERE, "compose")
with open(os.path.join(COMPOSE, "fleet.yml")) as f:
    compose = yaml.safe_load(f)  # PyYAML resolves the <<: merge keys as Compose does


def interpolate(v):
    """Compose's ${VAR:-default} / ${VAR-default} with the defaults (the environment ignored)."""
    if isinstance(v, str):
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", v)
    if isinstance(v, list):
        return [interpolate(x) for x in v]
    if isinstance(v, dict):
        return {k: interpolate(x) for k, x in v.items()}
    return v


services = interpolate(compose.get("services", {}))
gateways = sorted(n for n in services if n.startswith("gateway"))
check({"redis", "sim"} <= set(services) and len(gateways) == 3, f"compose/fleet.yml: redis, sim and 3 gateways ({gateways})")
sim_svc, redis_svc = services.get("sim", {}), services.get("redis", {})


def mounts(svc):
    """{container path: (source, read_only)} of a service's short-syntax volumes."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = (parts[0], parts[2:] == ["ro"])
    return out


def flag(cmd, name):
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == name]


# The image: deploy/Dockerfile with the simulator built in, the same for every service using it.
with open(os.path.join(HERE, "Dockerfile")) as f:
    dockerfile = f.read()
build = sim_svc.get("build", {})
check(os.path.normpath(os.path.join(COMPOSE, build.get("context", ""), build.get("dockerfile", "")))
      == os.path.join(HERE, "Dockerfile") and build.get("args", {}).get("FEATURES") == "sim"
      and re.search(r"^ARG FEATURES\b", dockerfile, re.M) and '--features "${FEATURES}"' in dockerfile,
      "compose: the simulator's image is deploy/Dockerfile built with FEATURES=sim")
image_env = dict(re.findall(r"(THINGSPACE_GATEWAY_[A-Z_]+)=(\S+)", dockerfile))

# The simulator: HTTPS with a certificate naming the host the gateways use, in a shared volume.
sim_cmd = sim_svc.get("command", [])
sim_listen = (flag(sim_cmd, "--listen") or ["127.0.0.1:8081"])[0]
sim_cert = (flag(sim_cmd, "--tls-cert-out") or [""])[0]
sim_names = flag(sim_cmd, "--tls-name")
cert_dir = tempfile.mkdtemp(prefix="tsgw-check-sim-")
cert = os.path.join(cert_dir, "sim.pem")
sim_args = [binary, "sim", "--listen", "127.0.0.1:0", "--tls-cert-out", cert]
for n in sim_names:
    sim_args += ["--tls-name", n]
probe, _ = start(sim_args, marker="stdout")
probe.terminate()
probe.wait(timeout=30)
sans = [v for _, v in ssl._ssl._test_decode_cert(cert).get("subjectAltName", ())]

# Redis: AOF, an eviction policy that keeps the login counts, the password the URLs carry.
redis_cmd = redis_svc.get("command", [])
urls = {g: services[g].get("environment", {}).get("THINGSPACE_GATEWAY_REDIS__URL", "") for g in gateways}
url_password = urllib.parse.urlsplit(next(iter(urls.values()), "")).password
check(redis_cmd[:1] == ["redis-server"] and "/data" in mounts(redis_svc), "compose redis: redis-server with its data on a volume")
check_redis(redis_cmd[1:], "compose/fleet.yml redis", (flag(redis_cmd, "--requirepass") or [None])[0], url_password)

effective = {}
for g in gateways:
    svc = services[g]
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    m = mounts(svc)
    cmd = svc.get("command", [])
    conf_path = (flag(cmd, "--config") or [""])[0]
    src, _ = m.get(conf_path, ("", False))
    check(svc.get("image") == sim_svc.get("image") and svc.get("build") == build and cmd[:1] == ["serve"]
          and os.path.isfile(os.path.join(COMPOSE, src)),
          f"compose {g}: the demo image, serve --config {conf_path} mounted from {src}")
    with open(os.path.join(COMPOSE, src)) as f:
        toml_text = f.read()
    cfg = tomllib.loads(toml_text)
    redis_env = {k: v for k, v in env.items() if k.startswith("THINGSPACE_GATEWAY_REDIS__") and k != "THINGSPACE_GATEWAY_REDIS__URL"}
    base = urllib.parse.urlsplit(env.get("THINGSPACE_GATEWAY_UPSTREAM__BASE_URL", cfg["upstream"]["base_url"]))
    url = urllib.parse.urlsplit(env.get("THINGSPACE_GATEWAY_REDIS__URL", ""))
    ca = env.get("THINGSPACE_GATEWAY_UPSTREAM__CA_FILE", cfg["upstream"].get("ca_file", ""))
    # The CA file is the simulator's certificate, through the same volume.
    sim_vol = next(((c, s) for c, (s, _) in mounts(sim_svc).items() if sim_cert.startswith(c + "/")), None)
    gw_vol = next((c for c, (s, _) in m.items() if sim_vol and s == sim_vol[1]), None)
    check(base.scheme == "https" and base.hostname == "sim" and str(base.port) == sim_listen.rsplit(":", 1)[1]
          and base.hostname in sans and gw_vol is not None
          and ca == gw_vol + sim_cert[len(sim_vol[0]):],
          f"compose {g}: upstream https://sim (the simulator by service name, its certificate names {sans}) with its CA from the shared volume")
    check(url.hostname == "redis" and url.port == 6379, f"compose {g}: redis.url points at the redis service")
    effective[g] = (
        env.get("THINGSPACE_GATEWAY_REDIS__URL"),
        env.get("THINGSPACE_GATEWAY_REDIS__KEY_PREFIX", cfg.get("redis", {}).get("key_prefix", "tsgw:")),
        env.get("THINGSPACE_GATEWAY_TOKEN_KEY", cfg.get("clients", {}).get("token_signing_key", "")),
        env.get("THINGSPACE_GATEWAY_REDIS__MAX_REPLICAS", cfg.get("redis", {}).get("max_replicas", 4)),
        toml_text, tuple(sorted(redis_env.items())),
    )
    check_config(toml_text, {**image_env, **env, "THINGSPACE_GATEWAY_UPSTREAM__CA_FILE": cert},
                 f"compose {g}'s config (image env + its environment)")
check(len(set(effective.values())) == 1 and len(effective) == 3,
      "compose: every gateway has the same redis url, key_prefix, token key, max_replicas and config")
if effective:
    check(int(next(iter(effective.values()))[3]) >= len(gateways) + 1,
          "compose: max_replicas counts the gateways and one more for a restart")
published = [p for svc in services.values() for p in svc.get("ports", [])]
check(published and all(p.startswith("127.0.0.1:") for p in published)
      and len({p.split(":")[1] for p in published}) == len(published),
      f"compose: ports published on the host's loopback only, each once ({len(published)})")
shutil.rmtree(cert_dir, ignore_errors=True)

# The fleet demo script parses (it runs in a few seconds with `--check`, against fleet code).
r = run("bash", "-n", os.path.join(HERE, "fleet-demo.sh"))
check(r.returncode == 0, "fleet-demo.sh parses (bash -n) " + r.stderr.strip())

# Alert rules and scrape config.
r = run("promtool", "check", "rules", os.path.join(HERE, "prometheus", "alerts.yml"))
check(r.returncode == 0, "promtool check rules prometheus/alerts.yml " + (r.stderr.strip() if r.returncode else ""))
r = run("promtool", "test", "rules", os.path.join(HERE, "prometheus", "alerts.test.yml"))
check(r.returncode == 0, "promtool test rules prometheus/alerts.test.yml (the fleet alerts) " + ((r.stdout + r.stderr).strip()[-500:] if r.returncode else ""))
r = run("promtool", "check", "config", os.path.join(HERE, "prometheus", "scrape.yml"))
check(r.returncode == 0, "promtool check config prometheus/scrape.yml " + (r.stderr.strip() if r.returncode else ""))

# A live gateway in front of the simulator, with some traffic.
sim, sim_url = start([binary, "sim", "--listen", "127.0.0.1:0"], marker="stdout")
env = dict(os.environ)
env.update({
    "THINGSPACE_GATEWAY_SERVER__LISTEN": "127.0.0.1:0",
    "THINGSPACE_GATEWAY_SERVER__ADMIN_LISTEN": "127.0.0.1:0",
    "THINGSPACE_GATEWAY_UPSTREAM__BASE_URL": sim_url,
    "THINGSPACE_GATEWAY_LOG__FORMAT": "json",
})
gw, (listen, admin) = start([binary, "serve", "--config", os.path.join(os.path.dirname(HERE), "config", "demo.toml")], env=env, marker="stderr")
try:
    accounts = json.loads(get(f"{sim_url}/_sim/accounts"))
    acct = accounts[0]["accountName"]
    for path in [f"/api/fota/v1/licenses/{acct}/index/0"] * 3 + [f"/gateway/v1/accounts/{acct}/licenses", "/nope"]:
        try:
            get(f"http://{listen}{path}")
        except Exception:
            pass
    scrape = get(f"http://{admin}/metrics")
    with tempfile.NamedTemporaryFile("w", suffix=".prom", delete=False) as t:
        t.write(scrape)
    r = subprocess.run(["promtool", "check", "metrics"], stdin=open(t.name), capture_output=True, text=True)
    # promtool exits non-zero on lint findings; any finding fails the check.
    check(r.returncode == 0, "promtool check metrics on a live scrape " + (r.stdout + r.stderr).strip())
    live = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", scrape, re.M))
    with open(os.path.join(HERE, "grafana", "thingspace-gateway.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    with open(os.path.join(HERE, "prometheus", "alerts.yml")) as f:
        exprs += [r["expr"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    used = set(re.findall(r"\b((?:thingspace_gateway|process)_[a-z0-9_]+)", " ".join(exprs)))
    missing = sorted(used - live)
    check(not missing and len(used) > 10, f"every metric the dashboard and alerts query ({len(used)}) is in the scrape; missing: {missing}")
finally:
    for p in (gw, sim):
        p.terminate()
        p.wait(timeout=30)

if failures:
    print(f"{len(failures)} deploy check(s) failed")
    sys.exit(1)
print("deploy checks passed")
