"""vLLM's KV-event publisher for routing tests: vLLM's msgspec structures (array_like,
tagged, as in vllm/distributed/kv_events.py) sent like its ZmqEventPublisher, multipart
[topic, seq as 8-byte big-endian, msgpack KVEventBatch], on a PUB socket.

usage: kv_publisher.py ENDPOINT [FIRST_SEQ]
Prints `publishing on ENDPOINT` first, then reads one JSON command per stdin line and
answers `sent SEQ`:
  {"stored": [hashes], "parent": h or null, "tokens": [...], "block_size": 16}
  {"removed": [hashes]}
  {"cleared": true}
  {"skip": N}        (advance the sequence by N without sending: a gap)
"""
import json
import sys
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
    pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
    print(f"sent {seq}", flush=True)
    seq += 1
