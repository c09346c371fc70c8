#!/usr/bin/env python3
"""Checks the deploy kit against a live gateway: promtool on a real scrape and on the alert rules,
every metric the dashboard and the alerts query exists in that scrape, the manifests parse, and
the ConfigMap's gateway.toml passes check-config. Usage: check.py PATH_TO_BINARY"""
import json, os, re, subprocess, sys, tempfile, time, urllib.request

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


# Manifests parse.
for name in sorted(os.listdir(os.path.join(HERE, "kubernetes"))):
    with open(os.path.join(HERE, "kubernetes", name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    check(all("kind" in d and "apiVersion" in d for d in docs), f"kubernetes/{name} parses ({len(docs)} objects)")

# The ConfigMap's config is valid.
with open(os.path.join(HERE, "kubernetes", "configmap.yaml")) as f:
    cm = yaml.safe_load(f)
with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as t:
    t.write(cm["data"]["gateway.toml"])
r = run(binary, "check-config", "--config", t.name)
check(r.returncode == 0, "kubernetes/configmap.yaml gateway.toml passes check-config " + r.stderr.strip())

# Alert rules and scrape config.
r = run("promtool", "check", "rules", os.path.join(HERE, "prometheus", "alerts.yml"))
check(r.returncode == 0, "promtool check rules prometheus/alerts.yml " + (r.stderr.strip() if r.returncode else ""))
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
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
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
