"""vLLM's KV-event publisher for routing tests: vLLM's msgspec structures (array_like,
tagged, as in vllm/distributed/kv_events.py) sent like its ZmqEventPublisher, multipart
[topic, seq as 8-byte big-endian, msgpack KVEventBatch], on a PUB socket.

usage: kv_publisher.py ENDPOINT [FIRST_SEQ [REPLAY_ENDPOINT]]
Prints `publishing on ENDPOINT` first (then `replay on ENDPOINT` with a replay socket),
then reads one JSON command per stdin line and answers `sent SEQ`:
  {"stored": [hashes], "parent": h or null, "tokens": [...], "block_size": 16}
  {"removed": [hashes]}
  {"cleared": true}
  {"skip": N}        (advance the sequence by N without sending: a gap)
Any event command with "lost": true is numbered and kept for replay but not sent on the
PUB socket: a gap that the replay socket can fill. The replay socket is vLLM's: a ROUTER
answering [id, "", start_seq] with [id, "", seq, payload] for each kept batch from
start_seq on, then [id, "", -1, ""].
"""
import json
import sys
import threading
import time

import msgspec
import zmq


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


endpoint = sys.argv[1]
seq = int(sys.argv[2]) if len(sys.argv) > 2 else 0
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
pub.setsockopt(zmq.LINGER, 0)
pub.bind(endpoint)
print(f"publishing on {pub.getsockopt(zmq.LAST_ENDPOINT).decode()}", flush=True)
kept, kept_lock = [], threading.Lock()


def serve_replay(sock):
    while True:
        ident, _, start = sock.recv_multipart()
        start = int.from_bytes(start, "big")
        with kept_lock:
            batches = [(s, p) for s, p in kept if s >= start]
        for s, p in batches:
            sock.send_multipart([ident, b"", s.to_bytes(8, "big"), p])
        sock.send_multipart([ident, b"", (-1).to_bytes(8, "big", signed=True), b""])


if len(sys.argv) > 3:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(sys.argv[3])
    print(f"replay on {router.getsockopt(zmq.LAST_ENDPOINT).decode()}", flush=True)
    threading.Thread(target=serve_replay, args=(router,), daemon=True).start()
enc = msgspec.msgpack.Encoder()
for line in sys.stdin:
    cmd = json.loads(line)
    if "skip" in cmd:
        seq += cmd["skip"]
        print(f"skipped to {seq}", flush=True)
        continue
    if "stored" in cmd:
        ev = BlockStored(cmd["stored"], cmd.get("parent"), cmd["tokens"], cmd["block_size"], None, "GPU")
    elif "removed" in cmd:
        ev = BlockRemoved(cmd["removed"], "GPU")
    else:
        ev = AllBlocksCleared()
    payload = enc.encode(KVEventBatch(ts=time.time(), events=[ev]))
    with kept_lock:
        kept.append((seq, payload))
    if cmd.get("lost"):
        print(f"skipped {seq} (kept for replay)", flush=True)
    else:
        pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        print(f"sent {seq}", flush=True)
    seq += 1
