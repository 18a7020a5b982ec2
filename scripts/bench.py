#!/usr/bin/env python3
"""Load benchmark: the gateway against a bare Pingora proxy (the framework's ceiling), nginx and
HAProxy, on the same machine, in the same run.

Layout (as in issue 10): the upstream (nginx, 1 worker) and the proxy under test share core 0,
wrk runs on core 1 (1 thread, 64 connections). Each cell is the median of BENCH_RUNS runs of
BENCH_SECONDS. Before every measurement the answer is checked (status and body), so a fast
wrong answer cannot count. Run through scripts/bench.sh, which installs and builds what is needed.
"""
import http.client
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
IDLE = int(os.environ.get("BENCH_IDLE_CONNECTIONS", "10000"))
# Gateway variants measured on the scenarios that use the store (the JWT path with two rate-limit
# policies, the login guard): memory, one Redis, a 3-master Redis Cluster (all on core 0).
STORES = [s for s in os.environ.get("BENCH_STORES", "memory,redis,cluster").split(",") if s]
# The same gateway with its JSON access log on (one line per request, through the log thread),
# measured beside the memory-store gateway (log off) on the same scenarios.
ACCESS_LOG = os.environ.get("BENCH_ACCESS_LOG", "1") == "1"
# TLS and HTTP/2 scenarios (nginx, the bare Pingora proxy and the gateway, same certificate).
TLS = os.environ.get("BENCH_TLS", "1") == "1"
# h2load's load: connections and concurrent streams on each.
H2_CONNS = int(os.environ.get("BENCH_H2_CONNECTIONS", "8"))
H2_STREAMS = int(os.environ.get("BENCH_H2_STREAMS", "16"))
# Only the scenarios whose names start with one of these (comma-separated), e.g. "TLS,HTTP/2".
ONLY = [p for p in os.environ.get("BENCH_ONLY", "").split(",") if p]
# Pingora's runtime for both Pingora proxies: "true" (work stealing, the default) or "false".
WORK_STEALING = os.environ.get("BENCH_WORK_STEALING", "true")
SECRET = "bench-secret-0123456789abcdef0123"
OK_BODY = '{"status":"success","data":{"id":"c-17"}}'  # 39 bytes
HTML_500 = "<html><body><h1>500</h1><pre>Traceback: db-primary.internal refused</pre></body></html>"
ENV_500 = '{"status":"error","message":"internal server error"}'
ENV_401 = '{"status":"error","message":"invalid credentials"}'


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on {port}")


def start(cmd, cpu, env=None, log=None):
    full = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(full, env=env, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)


def tree(pid):
    """`pid` and its descendants (nginx's workers are children of its master)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids += tree(int(child))
    except OSError:
        pass
    return pids


def vm(pid, field):
    """`field` of /proc/<pid>/status in KiB, summed over the process tree."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def idle_rss(pid, port, limit):
    """RSS (KiB) before and with `limit` keep-alive connections that each made one request.
    Connections open in batches of CONNS (the load's concurrency): what is measured is idle
    connections, not `limit` requests in flight at once."""
    before = vm(pid, "VmRSS")
    socks = []
    while len(socks) < limit:
        batch = []
        for _ in range(min(CONNS, limit - len(socks))):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: b\r\n\r\n")
                batch.append(s)
            except OSError:
                break
        if not batch:
            break
        for s in batch:
            try:
                s.recv(4096)
            except OSError:
                pass
        socks += batch
    time.sleep(1)
    after = vm(pid, "VmRSS")
    for s in socks:
        s.close()
    return before, after, len(socks)


def token():
    import base64, hashlib, hmac
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"tid": "t-1", "sub": "u-1", "role": "agent", "iss": "get2dial",
                             "aud": "get2dial-control", "exp": 4102444800}).encode())
    sig = b64(hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest())
    return f"{header}.{claims}.{sig}"


def request(port, method, path, headers=None, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def wrk(port, scenario):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency"]
    for k, v in scenario.get("headers", {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if scenario.get("lua"):
        cmd += ["-s", scenario["lua"]]
    scheme = "https" if scenario.get("tls") else "http"
    cmd.append(f"{scheme}://127.0.0.1:{port}{scenario['path']}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return rps, ms("50"), ms("99"), (errors.group(1) if errors else "")


def h2load(port, scenario, log):
    """HTTP/2 over TLS: H2_CONNS connections with H2_STREAMS streams each, for SECONDS (h2load,
    one thread on core 1). p50/p99 from h2load's per-request log; every request must succeed."""
    cmd = ["taskset", "-c", "1", "h2load", "-t1", f"-c{H2_CONNS}", f"-m{H2_STREAMS}",
           f"-D{SECONDS}", f"--log-file={log}", f"https://127.0.0.1:{port}{scenario['path']}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done, ok = map(int, re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out).groups())
    codes = re.search(r"status codes: (\d+) 2xx", out)
    errors = "" if ok == done and codes and int(codes.group(1)) == done else f"{done - ok} failed of {done}"
    with open(log) as f:
        durations = sorted(int(line.split()[2]) / 1000 for line in f if line.strip())
    pick = lambda q: durations[min(len(durations) - 1, int(q * len(durations)))] if durations else 0.0
    return rps, pick(0.50), pick(0.99), errors


def https_check(port, path):
    """Status and body of one HTTPS/1.1 request (the bench's own certificate, not verified)."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    c.request("GET", path)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def main():
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    tmp = tempfile.mkdtemp(prefix="g2d-bench-")
    os.chmod(tmp, 0o755)  # nginx workers drop privileges and must read the 64 KiB file
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    gateway = os.path.join(ROOT, "target/release/get2dial-gateway")
    bare = os.environ["BARE_PROXY_BIN"]
    up, ngx, hap, bare_port, gw, admin = (free_port() for _ in range(6))
    store_ports = {name: (free_port(), free_port()) for name in STORES if name != "memory"}
    if ACCESS_LOG:
        store_ports["access log"] = (free_port(), free_port())
    tls_ports = {"nginx": free_port(), "bare pingora": free_port(), "gateway": free_port()}
    cert, key = f"{tmp}/cert.pem", f"{tmp}/key.pem"
    if TLS:
        # ECDSA P-256, what an edge certificate usually is; all three proxies serve the same one.
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
                        "-days", "2", "-keyout", key, "-out", cert], check=True, capture_output=True)
        os.chmod(key, 0o644)
    redis_port = free_port()
    cluster_ports = [(free_port(), free_port()) for _ in range(3)]
    with open(os.path.join(tmp, "big.bin"), "wb") as f:
        f.write(bytes(i % 251 for i in range(64 * 1024)))
    os.chmod(os.path.join(tmp, "big.bin"), 0o644)

    common = f"""worker_processes 1; daemon off; pid {tmp}/%s.pid; error_log {tmp}/%s.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 120s;
"""
    write(f"{tmp}/up.conf", common % ("up", "up") + f"""
  server {{ listen 127.0.0.1:{up} reuseport;
    location = /ok {{ default_type application/json; return 200 '{OK_BODY}'; }}
    location = /big {{ default_type application/octet-stream; alias {tmp}/big.bin; }}
    location = /html-500 {{ default_type text/html; return 500 '{HTML_500}'; }}
    location = /api/v1/auth/login {{ default_type application/json; return 401 '{ENV_401}'; }}
    location /api/ {{ default_type application/json; return 200 '{OK_BODY}'; }}
  }}
}}""")
    # nginx 1.22 (Debian 12): `listen ... http2`; session cache off and tickets on, its defaults.
    nginx_tls = "" if not TLS else f"""server {{ listen 127.0.0.1:{tls_ports['nginx']} ssl http2 reuseport;
    ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;
    http2_max_concurrent_streams 128;
    proxy_http_version 1.1; proxy_set_header Connection "";
    location / {{ proxy_pass http://up; }}
  }}"""
    write(f"{tmp}/proxy.conf", common % ("px", "px") + f"""
  upstream up {{ server 127.0.0.1:{up}; keepalive 128; }}
  server {{ listen 127.0.0.1:{ngx} reuseport;
    proxy_http_version 1.1; proxy_set_header Connection "";
    location / {{ proxy_pass http://up; }}
    location = /html-500 {{ proxy_pass http://up; proxy_intercept_errors on; error_page 500 = @envelope; }}
    location @envelope {{ default_type application/json; return 500 '{ENV_500}'; }}
  }}
  {nginx_tls}
}}""")
    # HAProxy refuses to start when 2 x maxconn exceeds the file limit; idle connections beyond
    # its maxconn would only queue, so its idle figure is taken at what it can hold.
    hap_maxconn = min(IDLE + 2 * CONNS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 - 100)
    write(f"{tmp}/haproxy.cfg", f"""
global
  nbthread 1
  maxconn {hap_maxconn}
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  http-reuse always
frontend px
  bind 127.0.0.1:{hap}
  use_backend intercept if {{ path /html-500 }}
  default_backend up
backend up
  server up 127.0.0.1:{up}
backend intercept
  http-response return status 500 content-type application/json string '{ENV_500}' if {{ status 500 }}
  server up 127.0.0.1:{up}
""")
    def gateway_config(name, listen, admin_listen, store, access_log="false", tls=""):
        write(f"{tmp}/{name}.toml", f"""
{tls}
[server]
work_stealing = {WORK_STEALING}
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin_listen}"
threads = 1
upgrade_sock = "{tmp}/{name}-upgrade.sock"
{store}
[log]
level = "{'warn,access=info' if access_log == 'true' else 'warn'}"
format = "json"
access_log = {access_log}
[jwt]
secrets = ["env:BENCH_JWT_SECRET"]
[[upstreams]]
name = "up"
servers = ["127.0.0.1:{up}"]
[[routes]]
name = "ok"
path_prefix = "/ok"
upstream = "up"
auth = "public"
[[routes]]
name = "big"
path_prefix = "/big"
upstream = "up"
auth = "public"
[[routes]]
name = "html"
path_prefix = "/html-500"
upstream = "up"
auth = "public"
[[routes]]
name = "login"
path_prefix = "/api/v1/auth/login"
methods = ["POST"]
upstream = "up"
auth = "public"
login_guard = true
max_body_bytes = 4096
[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "up"
auth = "jwt"
rate_limits = [
  {{ name = "per-ip", key = "ip", per_second = 1000000, burst = 1000000 }},
  {{ name = "per-user", key = "user", per_second = 1000000, burst = 1000000 }},
]
""")
    tls_section = "" if not TLS else f"""[tls]
listen = "127.0.0.1:{tls_ports['gateway']}"
http2 = true
certificates = [{{ cert_file = "{cert}", key_file = "{key}" }}]
"""
    gateway_config("gateway", gw, admin, "", tls=tls_section)
    store_sections = {
        "redis": f'[store]\nkind = "redis"\nredis_url = "redis://127.0.0.1:{redis_port}"',
        "cluster": '[store]\nkind = "redis-cluster"\nredis_urls = [' +
                   ", ".join(f'"redis://127.0.0.1:{p}"' for p, _ in cluster_ports) + "]",
    }
    for name, (listen, admin_listen) in store_ports.items():
        if name == "access log":
            gateway_config("gateway-access log", listen, admin_listen, "", access_log="true")
        else:
            gateway_config(f"gateway-{name}", listen, admin_listen, store_sections[name])
    login_lua = write(f"{tmp}/login.lua", """
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"email":"user%d@bench.example","password":"wrong"}', n)
  return wrk.format("POST", "/api/v1/auth/login", {["Content-Type"] = "application/json"}, body)
end
""")
    procs = []
    try:
        procs.append(start([nginx, "-c", f"{tmp}/up.conf", "-p", tmp], 0))
        wait_port(up)
        redis_base = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
        if "redis" in STORES:
            procs.append(start(redis_base + ["--port", str(redis_port)], 0))
            wait_port(redis_port)
        if "cluster" in STORES:
            for i, (port, bus) in enumerate(cluster_ports):
                procs.append(start(redis_base + ["--port", str(port), "--cluster-enabled", "yes",
                                                 "--cluster-port", str(bus),
                                                 "--cluster-config-file", f"{tmp}/nodes-{i}.conf"], 0))
                wait_port(port)
            subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p, _ in cluster_ports],
                            "--cluster-yes"], check=True, stdout=subprocess.DEVNULL)
            deadline = time.time() + 20
            while b"cluster_state:ok" not in subprocess.run(
                    ["redis-cli", "-p", str(cluster_ports[0][0]), "cluster", "info"],
                    capture_output=True).stdout:
                if time.time() > deadline:
                    raise SystemExit("bench: the Redis Cluster never became ok")
                time.sleep(0.1)
        def launch():
            """The four proxies under test, each on core 0, listening when this returns."""
            targets = {
                "nginx": (start([nginx, "-c", f"{tmp}/proxy.conf", "-p", tmp], 0), ngx),
                "haproxy": (start([haproxy, "-db", "-f", f"{tmp}/haproxy.cfg"], 0), hap),
                "bare pingora": (start([bare], 0, env=dict(os.environ, BARE_PROXY_LISTEN=f"127.0.0.1:{bare_port}",
                                                            BARE_PROXY_UPSTREAM=f"127.0.0.1:{up}", BARE_PROXY_THREADS="1",
                                                            BARE_PROXY_WORK_STEALING=WORK_STEALING,
                                                            **({"BARE_PROXY_TLS_LISTEN": f"127.0.0.1:{tls_ports['bare pingora']}",
                                                                "BARE_PROXY_CERT": cert, "BARE_PROXY_KEY": key} if TLS else {}))), bare_port),
                "gateway": (start([gateway, "run", "--config", f"{tmp}/gateway.toml"], 0,
                                  env=dict(os.environ, BENCH_JWT_SECRET=SECRET), log=open(f"{tmp}/gateway.log", "a")), gw),
            }
            procs.extend(p for p, _ in targets.values())
            for _, port in targets.values():
                wait_port(port)
            return targets

        targets = launch()
        # The gateway on a shared store, measured where the store works.
        for name, (listen, _) in store_ports.items():
            proc = start([gateway, "run", "--config", f"{tmp}/gateway-{name}.toml"], 0,
                         env=dict(os.environ, BENCH_JWT_SECRET=SECRET), log=open(f"{tmp}/gateway-{name}.log", "a"))
            procs.append(proc)
            wait_port(listen)
            targets[f"gateway {name}"] = (proc, listen)
        store_targets = {f"gateway {name}" for name in store_ports}
        auth = {"Authorization": f"Bearer {token()}"}
        login_body = '{"email":"check@bench.example","password":"wrong"}'
        scenarios = [
            {"name": "pass-through 39 B JSON", "path": "/ok",
             "check": {"*": (200, OK_BODY)}},
            {"name": "JWT + 2 rate limits + metrics", "path": "/api/v1/calls", "headers": auth,
             "check": {"*": (200, OK_BODY)}, "stores": True},
            {"name": "upstream HTML 500 -> envelope", "path": "/html-500",
             "check": {"bare pingora": (500, HTML_500), "*": (500, ENV_500)}},
            {"name": "64 KiB success body", "path": "/big",
             "check": {"*": (200, None)}},
            {"name": "login guard (401, fresh emails)", "path": "/api/v1/auth/login", "lua": login_lua,
             "method": "POST", "body": login_body, "check": {"*": (401, ENV_401)}, "stores": True},
        ]
        if TLS:
            scenarios += [
                {"name": "TLS 1.3 handshakes (a new connection per request)", "path": "/ok", "tls": True,
                 "headers": {"Connection": "close"}, "check": {"*": (200, OK_BODY)}},
                {"name": "TLS HTTP/1.1 keep-alive 39 B JSON", "path": "/ok", "tls": True,
                 "check": {"*": (200, OK_BODY)}},
                {"name": f"HTTP/2 {H2_CONNS} conns x {H2_STREAMS} streams 39 B JSON", "path": "/ok", "tls": True,
                 "h2": True, "check": {"*": (200, OK_BODY)}},
                {"name": f"HTTP/2 {H2_CONNS} conns x {H2_STREAMS} streams 64 KiB", "path": "/big", "tls": True,
                 "h2": True, "check": {"*": (200, None)}},
            ]
        if ONLY:
            scenarios = [sc for sc in scenarios if any(sc["name"].startswith(p) for p in ONLY)]
        results = []
        for sc in scenarios:
            measured = {n: t for n, t in targets.items() if sc.get("stores") or n not in store_targets}
            if sc.get("tls"):
                measured = {n: (targets[n][0], tls_ports[n]) for n in tls_ports}
            for name, (proc, port) in measured.items():
                status, expect = sc["check"].get(name, sc["check"].get("*"))
                if sc.get("tls"):
                    got_status, got = https_check(port, sc["path"])
                else:
                    got_status, got = request(port, sc.get("method", "GET"), sc["path"],
                                              headers=dict(sc.get("headers", {}), **({"Content-Type": "application/json"} if sc.get("body") else {})),
                                              body=sc.get("body"))
                if got_status != status or (expect is not None and got.decode(errors="replace") != expect):
                    raise SystemExit(f"bench: {name} answers {sc['path']} wrongly: {got_status} {got[:200]!r}")
            # Runs take turns (nginx, haproxy, bare, gateway, nginx, ...) so that a slow spell of
            # the shared machine lands on every proxy rather than on one.
            runs = {name: [] for name in measured}
            for _ in range(RUNS):
                for name, (_, port) in measured.items():
                    if sc.get("h2"):
                        runs[name].append(h2load(port, sc, f"{tmp}/h2load.log"))
                    else:
                        runs[name].append(wrk(port, sc))
            for name, (proc, _) in measured.items():
                rps = statistics.median(r[0] for r in runs[name])
                p50 = statistics.median(r[1] for r in runs[name])
                p99 = statistics.median(r[2] for r in runs[name])
                errors = "; ".join(r[3] for r in runs[name] if r[3])
                results.append((sc["name"], name, rps, p50, p99, vm(proc.pid, "VmHWM"), errors))
                print(f"bench: {sc['name']:<32} {name:<13} {rps:>10.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms {errors}", file=sys.stderr)

        print()
        print(f"{SECONDS}s x {RUNS} runs (median, proxies taking turns), {CONNS} connections, wrk on core 1, proxy and upstream "
              f"on core 0, Pingora work_stealing = {WORK_STEALING}")
        print()
        print("| scenario | proxy | req/s | p50 ms | p99 ms | peak RSS MiB | vs bare Pingora | vs nginx |")
        print("|---|---|---|---|---|---|---|---|")
        by = {(s, n): (r, p50, p99) for s, n, r, p50, p99, _, _ in results}
        for s, n, r, p50, p99, rss, errors in results:
            bare_r, _, bare_p99 = by[(s, "bare pingora")]
            ngx_r, _, _ = by[(s, "nginx")]
            print(f"| {s} | {n} | {r:.0f} | {p50:.2f} | {p99:.2f} | {rss / 1024:.1f} | "
                  f"{r / bare_r:.2f}x (p99 {p99 / bare_p99:.2f}x) | {r / ngx_r:.2f}x |")

        if store_targets:
            print()
            print("| scenario | variant | req/s | vs memory store, log off | p99 vs it |")
            print("|---|---|---|---|---|")
            for s, n, r, p50, p99, rss, errors in results:
                if n in store_targets:
                    mem_r, _, mem_p99 = by[(s, "gateway")]
                    print(f"| {s} | {n.removeprefix('gateway ')} | {r:.0f} | {r / mem_r:.2f}x | {p99 / mem_p99:.2f}x |")

        # Idle keep-alive connections: RSS of each proxy holding IDLE of them, on fresh processes
        # (after the load the login flood's lockout table would be counted too).
        for name, (proc, _) in list(targets.items()):
            if name in store_targets:
                proc.kill()
                proc.wait(timeout=10)
                del targets[name]
        for proc, _ in targets.values():
            proc.kill()  # nothing to drain, and Pingora's graceful shutdown takes minutes
            proc.wait(timeout=10)
        targets = launch()
        print()
        print(f"| RSS with {IDLE} idle keep-alive connections | before MiB | with them MiB | KiB each |")
        print("|---|---|---|---|")
        for name, (proc, port) in targets.items():
            limit = min(IDLE, hap_maxconn - 2 * CONNS) if name == "haproxy" else IDLE
            before, after, n = idle_rss(proc.pid, port, limit)
            note = "" if n == IDLE else f" (only {n} connected)"
            print(f"| {name}{note} | {before / 1024:.1f} | {after / 1024:.1f} | "
                  f"{(after - before) / max(n, 1):.1f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
