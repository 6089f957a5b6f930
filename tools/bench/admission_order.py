#!/usr/bin/env python3
"""Admission order across workers (docs/resilience.md, "Admission control"): a 2-worker proxy
with max_concurrent_requests 1 in front of one xpyd-dummy; one request holds the slot, 30 more
queue one after another, then the slot frees; prints, per round, the order the node received
them and the inversions against arrival order. Run from the repository root after
`cargo build --bins`; uses ports 18420-18421."""
import json, socket, subprocess, sys, time, urllib.request
import os
B=os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../target/debug")
d=subprocess.Popen([f"{B}/xpyd-dummy","--port","18421","--mode","dual","--model","m","--workers","1","--record-requests","1000","--decode-delay-per-token","0.01"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
open("/tmp/adm-order.yaml","w").write('model: m\ndual: ["127.0.0.1:18421"]\nstartup: {probe_interval_seconds: 0.1}\nadmission: {max_concurrent_requests: 1, queue_size: 100, queue_timeout_seconds: 120}\n')
time.sleep(1)
p=subprocess.Popen([f"{B}/xpyd","proxy","-c","/tmp/adm-order.yaml","--port","18420","--workers","2"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
def get(u):
    return json.load(urllib.request.urlopen(u,timeout=10))
for _ in range(100):
    try:
        if urllib.request.urlopen("http://127.0.0.1:18420/health",timeout=1).status==200: break
    except Exception: time.sleep(0.1)
def send(prompt,mt):
    b=json.dumps({"model":"m","prompt":prompt,"max_tokens":mt}).encode()
    s=socket.create_connection(("127.0.0.1",18420))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"%len(b)+b)
    return s
def queued():
    return get("http://127.0.0.1:18420/status")["models"][0]["admission"]["state"]["queued"]
results=[]
for rnd in range(3):
    hold=send("hold",3000)
    while get("http://127.0.0.1:18420/status")["models"][0]["admission"]["state"]["in_flight"]<1: time.sleep(0.01)
    K=30; socks=[]
    for i in range(K):
        socks.append(send(f"r{rnd}q{i}",1))
        dl=time.time()+10
        while queued()<i+1 and time.time()<dl: time.sleep(0.005)
    hold.close()
    for s in socks:
        s.settimeout(60); s.recv(65536); s.close()
    order=[int(r["body"]["prompt"].split("q")[1]) for r in get("http://127.0.0.1:18421/debug/requests") if str(r["body"].get("prompt","")).startswith(f"r{rnd}q")]
    inv=sum(1 for a in range(len(order)) for b in range(a+1,len(order)) if order[a]>order[b])
    disp=max(abs(pos-v) for pos,v in enumerate(order))
    results.append({"round":rnd,"admitted":len(order),"inversions":inv,"pairs":len(order)*(len(order)-1)//2,"max_displacement":disp,"order":order})
print(json.dumps(results))
p.kill(); d.kill()
