#!/usr/bin/env python3
"""Side-by-side benchmark of the multihub hub against nginx on loopback (see README "Performance").

Every scenario runs the same wrk load (same connections, duration, keep-alive) against the hub and
against the nginx setup that does the same job; each server gets one worker (hub --threads 1,
nginx worker_processes 1). The two alternate for --rounds rounds and each row is the run with the
median rps (this VM's speed drifts by up to 1.5x within minutes). Prints a table and writes
bench/results/latest.json.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, deadline=30.0):
    end = time.time() + deadline
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early: {proc.args}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} not ready")


def wait_http(url, deadline=30.0):
    end = time.time() + deadline
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} not ready")


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def peak_rss_kb(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Procs:
    """Processes started for one scenario; stopped together."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, args, name):
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


NGINX_COMMON = """
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 65;
  client_body_buffer_size 1m;
  client_max_body_size 1m;
  client_body_temp_path {dir}/{name}.body;
  proxy_temp_path {dir}/{name}.proxy;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_request_buffering on;
{body}
}}
"""


def nginx(procs, name, body):
    conf = os.path.join(procs.workdir, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(NGINX_COMMON.format(dir=procs.workdir, name=name, body=body))
    return procs.start(["nginx", "-c", conf, "-g", "daemon off;"], name)


def upstream_block(name, port):
    return f"  upstream {name} {{ server 127.0.0.1:{port}; keepalive 128; }}\n"


def hub_table(hub_id, providers, route, pipeline=None):
    up = {"timeout_ms": 5000}
    if pipeline:
        up["pipeline"] = pipeline
    return {
        "version": "bench",
        # async_wait_ms: at the in-flight bound an async request waits for slots (back-pressure,
        # as nginx's mirror has by design) instead of its deliveries being dropped.
        "hub": {"id": hub_id, "advertise": "http://127.0.0.1:1", "max_body_bytes": 1048576, "max_in_flight": 4096,
                "async_wait_ms": 1000},
        "providers": {k: dict(up, url=v) for k, v in providers.items()},
        "routes": [dict({"id": "bench", "match": {"path_prefix": "/"}}, **route)],
    }


def start_hub(procs, bins, name, table, threads):
    path = os.path.join(procs.workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(table, f)
    port, admin = free_port(), free_port()
    p = procs.start([bins["hub"], "--routes", path, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     "--threads", str(threads), "--access-log", "off"], name)
    wait_http(f"http://127.0.0.1:{admin}/readyz")
    return p, port, admin


def wrk_script(workdir, body_bytes):
    path = os.path.join(workdir, f"post_{body_bytes}.lua")
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        if body_bytes <= 64:
            f.write('wrk.body = \'{"op":"transfer","target":"acct-1","amount":5}\'\n')
        else:
            f.write(f'wrk.body = string.rep("a", {body_bytes})\n')
    return path


UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)$", s)
    return float(m.group(1)) * UNIT[m.group(2)] if m else None


def run_wrk(port, args, script):
    cmd = ["wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", "-s", script,
           f"http://127.0.0.1:{port}/bench"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    res = {"rps": 0.0, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            res["rps"] = float(line.split()[1])
        m = re.match(r"(\d+) requests in", line)
        if m:
            res["requests"] = int(m.group(1))
        m = re.match(r"(50|99)(?:\.000)?%\s+(\S+)", line)
        if m:
            res[f"p{m.group(1)}_ms"] = parse_latency(m.group(2))
        if line.startswith("Non-2xx or 3xx responses:"):
            res["errors"] += int(line.split(":")[1])
        if line.startswith("Socket errors:"):
            res["errors"] += sum(int(x) for x in re.findall(r"\d+", line))
    res["raw"] = out
    return res


def measure(server_pids, port, args, script):
    pids = []
    for p in server_pids:
        pids.append(p)
        pids.extend(children(p))
    before = cpu_ticks(pids)
    res = run_wrk(port, args, script)
    after = cpu_ticks(pids)
    n = max(res["requests"], 1)
    res["cpu_us_per_req"] = (after - before) / CLK_TCK * 1e6 / n
    res["peak_rss_mb"] = peak_rss_kb(pids) / 1024.0
    return res


def hub_metrics(admin):
    """The hub's Prometheus text, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
            return r.read().decode()
    except Exception:
        return None


def samples(text, prefix):
    """Every nonzero sample of a metric family in `text`, by its labels."""
    out = {}
    for l in text.splitlines():
        if l.startswith(prefix) and not l.endswith(" 0"):
            k, v = l.rsplit(" ", 1)
            out[k[len(prefix):]] = float(v)
    return out


# Scenarios whose deliveries can be pipelined (an `accept` route's deliveries; the proxy
# scenarios' primary streams its answer, and slow_copy's only pipelinable delivery is the copy to
# the 20 ms upstream, which answers one request at a time).
PIPELINED = ("fanout3_confirmed", "fanout3_async", "body_64k")


def run_hub(name, args, bins, ups, slow_port, workdir, script, pipeline=None):
    """One measured run of the hub for a scenario (processes started and stopped here);
    `pipeline`: the upstreams' `pipeline` setting, or None."""
    u = {f"u{i}": f"http://127.0.0.1:{p}" for i, p in enumerate(ups, 1)}
    procs = Procs(workdir)
    try:
        extra = {}
        if name == "proxy":
            p, port, admin = start_hub(procs, bins, "hub", hub_table("hub-a", {"u1": u["u1"]}, {"targets": ["u1"], "respond": "proxy"}), args.hub_threads)
            pids = [p.pid]
        elif name in ("fanout3_confirmed", "body_64k"):
            p, port, admin = start_hub(procs, bins, "hub", hub_table("hub-a", u, {"targets": ["u1", "u2", "u3"], "delivery": "confirmed"}, pipeline), args.hub_threads)
            pids = [p.pid]
        elif name == "fanout3_async":
            p, port, admin = start_hub(procs, bins, "hub", hub_table("hub-a", u, {"targets": ["u1", "u2", "u3"], "delivery": "async"}, pipeline), args.hub_threads)
            pids = [p.pid]
        elif name == "slow_copy":
            prov = {"u1": u["u1"], "slow": f"http://127.0.0.1:{slow_port}"}
            p, port, admin = start_hub(procs, bins, "hub", hub_table("hub-a", prov, {"targets": ["u1", "slow"], "respond": "proxy"}), args.hub_threads)
            pids = [p.pid]
        elif name == "relay":
            pb, port_b, _ = start_hub(procs, bins, "hub-b", hub_table("hub-b", {"u1": u["u1"]}, {"targets": ["u1"], "respond": "proxy"}), args.hub_threads)
            pa, port, admin = start_hub(procs, bins, "hub-a", hub_table("hub-a", {"hub-b": f"http://127.0.0.1:{port_b}"}, {"targets": ["hub-b"], "respond": "proxy"}), args.hub_threads)
            pids = [pa.pid, pb.pid]
        else:
            raise ValueError(name)
        res = measure(pids, port, args, script)
        if name in ("fanout3_async", "slow_copy"):
            time.sleep(0.5)  # let background deliveries settle before reading the counters
            text = hub_metrics(admin)
            if text is None:
                extra["dropped"] = None
            else:
                extra["dropped_by"] = samples(text, "hub_deliveries_dropped_total")
                extra["dropped"] = sum(extra["dropped_by"].values())
                extra["failed"] = {k: v for k, v in samples(text, "hub_deliveries_total").items() if 'result="ok"' not in k}
        res.update(extra)
        return dict(res, scenario=name, server="multihub+pipeline" if pipeline else "multihub")
    finally:
        procs.stop()


def run_nginx(name, args, ups, slow_port, workdir, script):
    """One measured run of the nginx setup doing the same job."""
    procs = Procs(workdir)
    try:
        port = free_port()
        ups_blocks = "".join(upstream_block(f"up{i}", p) for i, p in enumerate(ups, 1))
        ups_blocks += upstream_block("slow", slow_port)
        if name == "proxy":
            body = ups_blocks + f"  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://up1; }} }}\n"
        elif name in ("fanout3_confirmed", "fanout3_async", "body_64k"):
            body = ups_blocks + (
                f"  server {{ listen 127.0.0.1:{port};\n"
                "    location / { mirror /m2; mirror /m3; proxy_pass http://up1; }\n"
                "    location = /m2 { internal; proxy_pass http://up2$request_uri; }\n"
                "    location = /m3 { internal; proxy_pass http://up3$request_uri; }\n  }\n")
        elif name == "slow_copy":
            body = ups_blocks + (
                f"  server {{ listen 127.0.0.1:{port};\n"
                "    location / { mirror /slow; proxy_pass http://up1; }\n"
                "    location = /slow { internal; proxy_pass http://slow$request_uri; }\n  }\n")
        elif name == "relay":
            port_b = free_port()
            nb = nginx(procs, "nginx-b", ups_blocks + f"  server {{ listen 127.0.0.1:{port_b}; location / {{ proxy_pass http://up1; }} }}\n")
            wait_port(port_b, nb)
            body = upstream_block("b", port_b) + f"  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://b; }} }}\n"
        n = nginx(procs, "nginx", body)
        wait_port(port, n)
        pids = [p.pid for p in procs.procs]
        res = measure(pids, port, args, script)
        return dict(res, scenario=name, server="nginx")
    finally:
        procs.stop()


def lower_median(values, key=None):
    """The middle element of `values` in sorted order (the lower one of an even count), or None."""
    ordered = sorted(values, key=key)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def median_run(runs):
    """The run with the median rps (its latencies and CPU go with it); every round's rps kept."""
    row = dict(lower_median(runs, key=lambda r: r["rps"]))
    row["rps_rounds"] = [round(r["rps"]) for r in runs]
    return row


def scenario(name, args, bins, ups, slow_port, workdir):
    """Runs one scenario for both servers, alternating them for --rounds rounds (so both see the
    same phases of a machine whose speed drifts); returns the two median rows."""
    script = wrk_script(workdir, 65536) if name == "body_64k" else wrk_script(workdir, 46)
    piped = {"depth": args.pipeline, "connections": args.pipeline_connections} if args.pipeline and name in PIPELINED else None
    hub, hub_piped, ngx = [], [], []
    for _ in range(args.rounds):
        hub.append(run_hub(name, args, bins, ups, slow_port, workdir, script))
        if piped:
            hub_piped.append(run_hub(name, args, bins, ups, slow_port, workdir, script, piped))
        ngx.append(run_nginx(name, args, ups, slow_port, workdir, script))
    rows = [median_run(hub)] + ([median_run(hub_piped)] if piped else []) + [median_run(ngx)]
    for row, runs in zip(rows, [hub] + ([hub_piped] if piped else [])):
        row.update(paired(runs, ngx))
    return rows


def paired(runs, ngx):
    """Round-by-round comparison with the nginx run of the same round (run minutes apart from
    it, so the machine's slow drift cancels): each round's rps ratio, their median, and in how
    many rounds the hub's p99 was at most nginx's."""
    ratios = [r["rps"] / n["rps"] for r, n in zip(runs, ngx) if n["rps"]]
    p99_ok = [r["p99_ms"] <= n["p99_ms"] for r, n in zip(runs, ngx)
              if r["p99_ms"] is not None and n["p99_ms"] is not None]
    return {
        "paired_ratios": [round(x, 3) for x in ratios],
        "paired_ratio_median": lower_median(ratios),
        "p99_at_most_nginx_rounds": [sum(p99_ok), len(p99_ok)],
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def ratio(v, width):
    """A ratio as "1.02x" right-aligned in `width`, or "-" when there is none."""
    return f"{'-' if v is None else format(v, '.2f') + 'x':>{width}}"


def p99_rounds(row):
    """"k/n": in k of n rounds the hub's p99 was at most nginx's; "-" for nginx rows."""
    k = row.get("p99_at_most_nginx_rounds")
    return f"{k[0]}/{k[1]}" if k else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2 s per scenario instead of 6")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=None, help="seconds per scenario per server (default 6, --quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating hub/nginx runs per scenario, median reported (default 3, --quick 1)")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--hub-threads", type=int, default=1)
    ap.add_argument("--scenarios", default="proxy,fanout3_confirmed,fanout3_async,slow_copy,relay,body_64k")
    ap.add_argument("--pipeline", type=int, default=16, metavar="DEPTH",
                    help="also run the fan-out scenarios with the upstreams' deliveries pipelined this deep (0: not)")
    ap.add_argument("--pipeline-connections", type=int, default=4, metavar="N", help="connections per upstream when pipelined")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--soak", type=int, default=0, metavar="SECONDS", help="instead: soak the hub proxy scenario at -c256 and sample RSS")
    ap.add_argument("--services", action="store_true", help="also run bench/provider and bench/association and add their rows")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 2 if args.quick else 6
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3

    subprocess.run([os.path.join(ROOT, "scripts", "ensure-deps"), "nginx", "wrk"], check=True)
    if not args.no_build:
        # The hub as it is built for production (profile `dist`: fat LTO, one codegen unit).
        subprocess.run(["cargo", "build", "--profile", "dist", "-q", "--bin", "multihub-hub", "--bin", "multihub-slow-upstream"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    bins = {"hub": os.path.join(target, "dist", "multihub-hub"), "slow": os.path.join(target, "dist", "multihub-slow-upstream")}

    workdir = tempfile.mkdtemp(prefix="multihub-bench-")
    base = Procs(workdir)
    try:
        ups = [free_port() for _ in range(3)]
        up_servers = "".join(
            f"  server {{ listen 127.0.0.1:{p}; location / {{ return 204; }} }}\n" for p in ups)
        nginx(base, "upstreams", up_servers)
        for p in ups:
            wait_port(p)
        slow = base.start([bins["slow"], "--listen", "127.0.0.1:0", "--delay-ms", "20"], "slow")
        slow_port = None
        log = os.path.join(workdir, "slow.log")
        for _ in range(200):
            text = open(log).read() if os.path.exists(log) else ""
            m = re.search(r"listening 127\.0\.0\.1:(\d+)", text)
            if m:
                slow_port = int(m.group(1))
                break
            time.sleep(0.02)
        if slow_port is None:
            raise RuntimeError("slow upstream did not start")

        if args.soak:
            return soak(args, bins, ups, workdir)

        rows = []
        for name in args.scenarios.split(","):
            print(f"running {name} ...", file=sys.stderr)
            rows.extend(scenario(name, args, bins, ups, slow_port, workdir))
    finally:
        base.stop()

    services = run_services(args) if args.services else []
    by = {(r["scenario"], r["server"]): r for r in rows}
    for r in rows:
        ref = by.get((r["scenario"], "nginx"))
        r["ratio_vs_nginx"] = r["rps"] / ref["rps"] if ref and ref["rps"] else None
        r.pop("raw", None)
    header = (f"{'scenario':<18} {'server':<17} {'rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/req':>10} {'rss MB':>7} "
              f"{'errors':>6} {'dropped':>7} {'vs nginx':>8} {'paired':>7} {'p99<=':>5}  rps of each round")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['scenario']:<18} {r['server']:<17} {r['rps']:>9.0f} {fmt(r['p50_ms'], '7.2f')} {fmt(r['p99_ms'], '7.2f')} "
              f"{r['cpu_us_per_req']:>10.1f} {r['peak_rss_mb']:>7.1f} {r['errors']:>6} {fmt(r.get('dropped'), '7.0f')} "
              f"{ratio(r['ratio_vs_nginx'], 8)} {ratio(r.get('paired_ratio_median'), 7)} {p99_rounds(r):>5}  "
              f"{' '.join(str(x) for x in r.get('rps_rounds', []))}")
    for sv in services:
        print(f"{sv['scenario']:<18} {sv['server']:<17} {sv['rate']:>9.0f} {sv['unit']}  ({sv['command']})")
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "connections": args.connections, "duration_s": args.duration, "rounds": args.rounds, "wrk_threads": args.wrk_threads,
        "hub_threads": args.hub_threads, "nginx_workers": 1,
        "pipeline": {"depth": args.pipeline, "connections": args.pipeline_connections} if args.pipeline else None,
        "command": " ".join(["bench/run"] + sys.argv[1:]),
    }
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "latest.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "services": services}, f, indent=2)
    shutil.rmtree(workdir, ignore_errors=True)


def run_services(args):
    """Provider receipts/s and association signals/s from their own drivers (their own rows)."""
    out = []
    # The association at 512 connections (group commit needs concurrency), once with its default
    # per-signature check and once with the opt-in batch check the issue allows.
    jobs = [("provider", ["bench/provider"], "receipts/s"),
            ("association", ["bench/association", "25000", "512", "2", "strict"], "signals/s"),
            ("association_batch", ["bench/association", "25000", "512", "2", "batch"], "signals/s")]
    for name, cmd, unit in jobs:
        if not os.path.exists(os.path.join(ROOT, cmd[0])):
            continue
        print(f"running {name} ...", file=sys.stderr)
        text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout
        rates = [float(m.group(1)) for m in re.finditer(r"([\d.]+)\s*" + re.escape(unit), text)]
        out.append({"scenario": f"{name}_{unit.split('/')[0]}", "server": "multihub", "rate": max(rates) if rates else 0.0,
                    "unit": unit, "command": " ".join(cmd), "tail": text.strip().splitlines()[-5:]})
    return out


def soak(args, bins, ups, workdir):
    procs = Procs(workdir)
    try:
        p, port, admin = start_hub(procs, bins, "hub", hub_table("hub-a", {"u1": f"http://127.0.0.1:{ups[0]}"}, {"targets": ["u1"], "respond": "proxy"}), args.hub_threads)
        script = wrk_script(workdir, 46)
        cmd = ["wrk", f"-t{args.wrk_threads}", "-c256", f"-d{args.soak}s", "--latency", "-s", script, f"http://127.0.0.1:{port}/bench"]
        w = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        samples = []
        while w.poll() is None:
            with open(f"/proc/{p.pid}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            samples.append(rss / 1024.0)
            time.sleep(10)
        out = w.stdout.read()
        errors = sum(int(x) for l in out.splitlines() if l.strip().startswith(("Socket errors", "Non-2xx")) for x in re.findall(r"\d+", l))
        warm = samples[len(samples) // 5:] or samples
        print(out)
        print(f"soak {args.soak}s -c256: RSS MB samples {['%.1f' % s for s in samples]}; after warm-up min {min(warm):.1f} max {max(warm):.1f} "
              f"({(max(warm) / min(warm) - 1) * 100:.1f}% spread); errors {errors}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
