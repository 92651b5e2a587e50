"""Contract tests: every Redis operation the system uses behaves the same on one Redis and on a
Redis Cluster (real servers both: `redis_backend` runs each test once per backend).

Stream names are the partitioned ones (`<producer>.events.{p3}`): the streams of one partition
share a hash tag, so on a cluster they live in one slot and one command may touch them all.
Where the cluster differs on purpose (a command across slots), the test says so.
"""

from __future__ import annotations

import threading

import pytest
import redis
from redis.exceptions import CrossSlotTransactionError, RedisClusterException

from service_runtime.redis_client import (
    REDIS_OUTAGE_ERRORS,
    ClusterUnreachableError,
    HeldConnection,
    RedisClient,
    by_slot,
    connect,
    flush,
    is_cluster,
    read,
    read_group,
    read_group_command,
    scan_keys,
    send_together,
    wake_blocked_reads,
    xreadgroup_entries,
)
from service_runtime.stream_fence import FencedRead, StreamFence
from tests.conftest import cluster_tests_enabled
from tests.helpers import blocked_by_name, wait_until

GROUP = "inventory"
PARTITION_STREAMS = [f"{name}.events.{{p3}}" for name in ("orders", "inventory", "billing")]


def _group_on(client: RedisClient, streams: list[str]) -> None:
    for stream in streams:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)


def _fill(client: RedisClient, streams: list[str], per_stream: int) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {stream: [] for stream in streams}
    for seq in range(per_stream):
        for stream in streams:
            ids[stream].append(client.xadd(stream, {"seq": str(seq)}))
    return ids


def test_connect_gives_the_backend_redis_cluster_asks_for(redis_backend: RedisClient, request):
    expected = request.node.callspec.params["redis_backend"] == "cluster"
    assert is_cluster(redis_backend) is expected
    assert redis_backend.ping()


def test_xgroup_create_mkstream_creates_the_stream_once(redis_backend: RedisClient):
    stream = PARTITION_STREAMS[0]
    assert redis_backend.xgroup_create(stream, GROUP, id="0", mkstream=True)
    assert redis_backend.exists(stream) == 1
    with pytest.raises(redis.ResponseError, match="BUSYGROUP"):
        redis_backend.xgroup_create(stream, GROUP, id="0", mkstream=True)


def test_one_pipeline_xadds_to_every_partition_in_order(redis_backend: RedisClient):
    """The relay's batch: XADDs to 8 partitions (8 slots, several nodes on a cluster) in one
    non-transactional pipeline; replies come back in queue order, entries land in order."""
    streams = [f"x.events.{{p{p}}}" for p in range(8)]
    pipe = redis_backend.pipeline(transaction=False)
    queued = []
    for seq in range(5):
        for stream in streams:
            pipe.xadd(stream, {"seq": str(seq)})
            queued.append(stream)
    replies = pipe.execute()

    assert len(replies) == len(queued)
    for stream in streams:
        entries = redis_backend.xrange(stream)
        assert [fields["seq"] for _, fields in entries] == ["0", "1", "2", "3", "4"]
        assert [entry_id for entry_id, _ in entries] == [
            reply for reply, target in zip(replies, queued, strict=True) if target == stream
        ]
    if is_cluster(redis_backend):  # the batch really spanned nodes
        nodes = {redis_backend.get_node_from_key(stream).name for stream in streams}
        assert len(nodes) > 1


@pytest.mark.parametrize("reader", ["read_group", "xreadgroup"])
def test_one_xreadgroup_reads_every_stream_of_a_partition(redis_backend: RedisClient, reader):
    _group_on(redis_backend, PARTITION_STREAMS)
    ids = _fill(redis_backend, PARTITION_STREAMS, per_stream=3)
    wanted = dict.fromkeys(PARTITION_STREAMS, ">")
    if reader == "read_group":
        reply = read_group(redis_backend, GROUP, "c1", wanted, count=2)
    else:
        reply = redis_backend.xreadgroup(GROUP, "c1", wanted, count=2)

    got = {stream: [entry_id for entry_id, _ in entries] for stream, entries in reply}
    assert got == {stream: ids[stream][:2] for stream in PARTITION_STREAMS}  # COUNT per stream


def _command_calls(client: RedisClient) -> int:
    """COMMAND calls (GETKEYS among them) served so far, summed over the nodes of a cluster."""
    if is_cluster(client):
        per_node = client.info("commandstats", target_nodes=redis.RedisCluster.PRIMARIES)
        stats = list(per_node.values())
    else:
        stats = [client.info("commandstats")]
    return sum(
        value["calls"]
        for node in stats
        for key, value in node.items()
        if key == "cmdstat_command" or key.startswith("cmdstat_command|")
    )


def test_a_pipelined_blocking_read_of_a_partition_asks_no_server_for_its_keys(
    redis_backend: RedisClient,
):
    """The consumer's fenced read is a pipeline with an XREADGROUP ... BLOCK: on a cluster,
    redis-py would send COMMAND GETKEYS for it (its keys are "movable"), one more round trip
    per read; read_group (`on=` the pipeline) routes it by the slot instead. The commands
    queued after a blocked read run once it returns."""
    _group_on(redis_backend, PARTITION_STREAMS)
    ids = _fill(redis_backend, PARTITION_STREAMS, per_stream=2)
    before = _command_calls(redis_backend)
    pipe = redis_backend.pipeline(transaction=False)
    cursors = dict.fromkeys(PARTITION_STREAMS, ">")
    read_group(redis_backend, GROUP, "c1", cursors, count=10, block=10, on=pipe)
    read_group(redis_backend, GROUP, "c1", cursors, count=10, block=10, on=pipe)  # times out
    pipe.xpending(PARTITION_STREAMS[0], GROUP)
    taken, nothing, summary = pipe.execute()
    assert {stream: [e for e, _ in entries] for stream, entries in taken} == ids
    assert not nothing
    assert summary["pending"] == 2
    assert _command_calls(redis_backend) == before


def test_xreadgroup_across_hash_tags_is_refused_only_by_the_cluster(redis_backend: RedisClient):
    streams = ["x.events.{p1}", "x.events.{p2}"]
    _group_on(redis_backend, streams)
    wanted = dict.fromkeys(streams, ">")
    if not is_cluster(redis_backend):
        assert redis_backend.xreadgroup(GROUP, "c1", wanted) == []
        return
    for attempt in (
        lambda: redis_backend.xreadgroup(GROUP, "c1", wanted),
        lambda: read_group(redis_backend, GROUP, "c1", wanted),
    ):
        with pytest.raises(RedisClusterException, match=r"slot|hash tag") as caught:
            attempt()
        assert not isinstance(caught.value, REDIS_OUTAGE_ERRORS)  # a bug, never retried


def test_by_slot_groups_keys_a_command_may_use_together(redis_backend: RedisClient):
    other = [f"{name}.events.{{p5}}" for name in ("orders", "billing")]
    keys = [PARTITION_STREAMS[0], other[0], *PARTITION_STREAMS[1:], other[1]]
    groups = by_slot(redis_backend, keys)
    if is_cluster(redis_backend):  # one group per partition, each in the order given
        assert groups == [PARTITION_STREAMS, other]
    else:
        assert groups == [keys]


def test_xread_reads_each_group_of_by_slot_in_one_command(redis_backend: RedisClient):
    streams = [*PARTITION_STREAMS, "orders.events.{p5}"]
    ids = _fill(redis_backend, streams, per_stream=2)
    got = {}
    for group in by_slot(redis_backend, streams):
        for stream, entries in read(redis_backend, dict.fromkeys(group, "0"), count=1):
            got[stream] = [entry_id for entry_id, _ in entries]
    assert got == {stream: ids[stream][:1] for stream in streams}  # COUNT per stream
    assert read(redis_backend, {streams[0]: ids[streams[0]][-1]}, block=50) == []
    if is_cluster(redis_backend):
        with pytest.raises(RedisClusterException, match="hash tag"):
            read(redis_backend, dict.fromkeys(streams, "0"))


def test_xreadgroup_block_returns_an_empty_reply_when_nothing_arrives(redis_backend):
    _group_on(redis_backend, PARTITION_STREAMS)
    wanted = dict.fromkeys(PARTITION_STREAMS, ">")
    assert read_group(redis_backend, GROUP, "c1", wanted, count=10, block=50) == []
    assert redis_backend.xreadgroup(GROUP, "c1", wanted, count=10, block=50) == []


def test_xreadgroup_block_wakes_up_for_a_new_entry(redis_backend: RedisClient):
    _group_on(redis_backend, PARTITION_STREAMS)
    replies: list = []
    reader = threading.Thread(
        target=lambda: replies.append(
            read_group(
                redis_backend, GROUP, "c1", dict.fromkeys(PARTITION_STREAMS, ">"), block=10_000
            )
        )
    )
    reader.start()
    # the reader is blocked once the server lists it as a blocked client
    wait_until(lambda: _blocked_clients(redis_backend, PARTITION_STREAMS[1]) > 0)
    entry_id = redis_backend.xadd(PARTITION_STREAMS[1], {"seq": "0"})
    reader.join(timeout=15)
    assert not reader.is_alive()
    assert replies == [[[PARTITION_STREAMS[1], [(entry_id, {"seq": "0"})]]]]


def _blocked_clients(client: RedisClient, key: str) -> int:
    if is_cluster(client):
        node = client.get_node_from_key(key)
        info = client.info("clients", target_nodes=node)
    else:
        info = client.info("clients")
    return int(info["blocked_clients"])


def _named_client(request: pytest.FixtureRequest, name: str) -> RedisClient:
    """Another client of the backend under test, its connections named `name`."""
    cluster = request.node.callspec.params["redis_backend"] == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "single_redis_url")
    return connect(url, name=name)


def test_a_blocked_fenced_read_is_woken_by_its_own_clients_name_only(
    redis_backend: RedisClient, request
):
    """A consumer stopping its workers wakes their blocked reads (the fenced read: XREADGROUP
    BLOCK, then the fence script) on the connections named after it, not anyone else's: the
    woken read returns empty, as when its block is up, its fence check still done."""
    partitions = {"inventory-1": 3, "inventory-2": 5}
    clients = {name: _named_client(request, name) for name in partitions}
    replies: dict[str, FencedRead] = {}

    def read(name: str) -> None:
        partition = partitions[name]
        streams = [f"{producer}.events.{{p{partition}}}" for producer in ("orders", "billing")]
        _group_on(redis_backend, streams)
        fence = StreamFence(clients[name])
        fence.claim(GROUP, partition, 1)
        cursors = dict.fromkeys(streams, ">")
        replies[name] = fence.read(GROUP, name, partition, 1, cursors, 10, block_ms=14_000)

    threads = {name: threading.Thread(target=read, args=(name,)) for name in partitions}
    for thread in threads.values():
        thread.start()
    wait_until(lambda: blocked_by_name(redis_backend) == {"inventory-1": 1, "inventory-2": 1})

    assert wake_blocked_reads(clients["inventory-1"]) == 1
    threads["inventory-1"].join(timeout=10)  # woken: well before its 14 s block is up
    assert not threads["inventory-1"].is_alive()
    assert replies["inventory-1"] == FencedRead(entries=[], others_pending=False)
    assert blocked_by_name(redis_backend) == {"inventory-2": 1}  # still waiting
    assert "inventory-2" not in replies

    assert wake_blocked_reads(clients["inventory-2"]) == 1
    threads["inventory-2"].join(timeout=10)
    assert replies["inventory-2"] == FencedRead(entries=[], others_pending=False)
    assert wake_blocked_reads(clients["inventory-1"]) == 0  # nobody waiting
    for client in clients.values():
        client.close()


def test_send_together_reads_every_reply_before_raising_the_first_error(
    redis_backend: RedisClient,
):
    """The fenced read's transport on a plain Redis: one round trip, replies as sent; an error
    reply in the middle is raised only after the rest are read, so the pooled connection's
    next use gets its own replies. A cluster needs its pipeline: refused."""
    if is_cluster(redis_backend):
        with pytest.raises(TypeError, match="plain Redis"):
            send_together(redis_backend, [["PING"]])
        return
    commands = [["SET", "k{p3}", "text"], ["INCR", "k{p3}"], ["APPEND", "k{p3}", "!"]]
    with pytest.raises(redis.ResponseError, match="not an integer"):
        send_together(redis_backend, commands)
    assert redis_backend.get("k{p3}") == "text!"  # the command after the error ran too
    assert send_together(redis_backend, [["GET", "k{p3}"], ["STRLEN", "k{p3}"]]) == ["text!", 5]


def test_a_held_connection_is_one_connection_that_comes_back_after_redis_drops_it(
    request,
):
    """A partition worker's reads keep one connection (HeldConnection): every round trip on
    the same server-side client, out of the pool until released; dropped by Redis (CLIENT
    KILL, a restart), the next round trip connects again under the same name."""
    client = connect(request.getfixturevalue("single_redis_url"), name="inventory-7")
    held = HeldConnection(client)
    [first] = held.send_together([["CLIENT", "ID"]])
    assert held.send_together([["CLIENT", "ID"], ["PING"]]) == [first, "PONG"]
    assert send_together(client, [["CLIENT", "ID"]]) != [first]  # the pool has another one
    client.client_kill_filter(_id=first)
    with pytest.raises(redis.ConnectionError):
        held.send_together([["PING"]])  # the dropped socket's next round trip
    [second] = held.send_together([["CLIENT", "ID"]])
    assert second != first
    assert held.send_together([["CLIENT", "GETNAME"]]) == ["inventory-7"]
    held.release()
    assert send_together(client, [["CLIENT", "ID"]]) == [second]  # back in the (LIFO) pool
    client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_xreadgroup_entries_reads_both_protocols_replies(request, protocol):
    """XREADGROUP's reply is a list of [stream, entries] in RESP2 and a map in RESP3; an entry
    trimmed while pending has no fields. Both read the same."""
    client = redis.Redis.from_url(
        request.getfixturevalue("single_redis_url"), protocol=protocol, decode_responses=True
    )
    flush(client)
    _group_on(client, PARTITION_STREAMS)
    ids = _fill(client, PARTITION_STREAMS, per_stream=2)
    command = read_group_command(GROUP, "c1", dict.fromkeys(PARTITION_STREAMS, ">"), count=10)
    [taken] = send_together(client, [command])
    assert xreadgroup_entries(taken) == [
        (stream, [(eid, {"seq": str(seq)}) for seq, eid in enumerate(ids[stream])])
        for stream in PARTITION_STREAMS
    ]
    client.xdel(PARTITION_STREAMS[0], ids[PARTITION_STREAMS[0]][0])
    pending = read_group_command(GROUP, "c1", {PARTITION_STREAMS[0]: "0"}, count=10)
    [again] = send_together(client, [pending])
    first, second = ids[PARTITION_STREAMS[0]]
    assert xreadgroup_entries(again) == [
        (PARTITION_STREAMS[0], [(first, None), (second, {"seq": "1"})])
    ]
    nothing = read_group_command(GROUP, "c1", {PARTITION_STREAMS[0]: ">"}, block=10)
    assert xreadgroup_entries(send_together(client, [nothing])[0]) == []
    client.close()


def test_waking_needs_a_named_client(redis_backend: RedisClient):
    with pytest.raises(ValueError, match="no name"):
        wake_blocked_reads(redis_backend)


def test_reading_id_0_gives_the_consumers_own_pending_entries(redis_backend: RedisClient):
    _group_on(redis_backend, PARTITION_STREAMS)
    ids = _fill(redis_backend, PARTITION_STREAMS, per_stream=2)
    read_group(redis_backend, GROUP, "c1", dict.fromkeys(PARTITION_STREAMS, ">"))

    own = read_group(redis_backend, GROUP, "c1", dict.fromkeys(PARTITION_STREAMS, "0"))
    assert {s: [i for i, _ in entries] for s, entries in own} == ids
    other = read_group(redis_backend, GROUP, "c2", dict.fromkeys(PARTITION_STREAMS, "0"))
    assert {s: entries for s, entries in other} == {stream: [] for stream in PARTITION_STREAMS}

    for stream in PARTITION_STREAMS:
        assert redis_backend.xack(stream, GROUP, *ids[stream]) == 2
    after = read_group(redis_backend, GROUP, "c1", dict.fromkeys(PARTITION_STREAMS, "0"))
    assert {s: entries for s, entries in after} == {stream: [] for stream in PARTITION_STREAMS}


def test_xpending_xclaim_and_xautoclaim(redis_backend: RedisClient):
    stream = PARTITION_STREAMS[0]
    _group_on(redis_backend, [stream])
    ids = _fill(redis_backend, [stream], per_stream=3)[stream]
    read_group(redis_backend, GROUP, "c1", {stream: ">"})

    summary = redis_backend.xpending(stream, GROUP)
    assert summary["pending"] == 3
    assert summary["consumers"] == [{"name": "c1", "pending": 3}]
    pending = redis_backend.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"], p["consumer"], p["times_delivered"]) for p in pending] == [
        (entry_id, "c1", 1) for entry_id in ids
    ]

    claimed = redis_backend.xclaim(stream, GROUP, "c2", min_idle_time=0, message_ids=[ids[0]])
    assert [entry_id for entry_id, _ in claimed] == [ids[0]]

    next_id, entries, *_deleted = redis_backend.xautoclaim(
        stream, GROUP, "c3", min_idle_time=0, start_id="0-0", count=10
    )
    assert next_id == "0-0"
    assert [entry_id for entry_id, _ in entries] == ids
    owners = redis_backend.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert {p["consumer"] for p in owners} == {"c3"}
    assert {p["times_delivered"] for p in owners} == {2, 3}  # c1 read, c2 claimed (1st), c3


def test_a_multi_pipeline_writes_a_dead_letter_and_acks_atomically(redis_backend: RedisClient):
    """A dead letter: XADD to the group's dead-letter stream and XACK of the entry, in one
    MULTI; both keys carry the partition's hash tag, so they share a slot on a cluster."""
    events, dead_letters = "x.events.{p3}", f"{GROUP}.dead-letters.{{p3}}"
    _group_on(redis_backend, [events])
    entry_id = redis_backend.xadd(events, {"seq": "0"})
    read_group(redis_backend, GROUP, "c1", {events: ">"})

    pipe = redis_backend.pipeline(transaction=True)
    pipe.xadd(dead_letters, {"entry_id": entry_id, "error": "boom"})
    pipe.xack(events, GROUP, entry_id)
    dead_id, acked = pipe.execute()

    assert acked == 1
    dead = [(dead_id, {"entry_id": entry_id, "error": "boom"})]
    assert redis_backend.xrange(dead_letters) == dead
    assert redis_backend.xpending(events, GROUP)["pending"] == 0


def test_a_multi_across_hash_tags_is_refused_only_by_the_cluster(redis_backend: RedisClient):
    pipe = redis_backend.pipeline(transaction=True)
    pipe.xadd("x.events.{p1}", {"seq": "0"})
    pipe.xadd("x.events.{p2}", {"seq": "0"})
    if not is_cluster(redis_backend):
        assert len(pipe.execute()) == 2
        return
    with pytest.raises(CrossSlotTransactionError) as caught:
        pipe.execute()
    assert not isinstance(caught.value, REDIS_OUTAGE_ERRORS)
    assert redis_backend.exists("x.events.{p1}", "x.events.{p2}") == 0  # nothing half-written


def test_xinfo_groups_stream_and_consumers(redis_backend: RedisClient):
    stream = PARTITION_STREAMS[0]
    _group_on(redis_backend, [stream])
    ids = _fill(redis_backend, [stream], per_stream=2)[stream]
    read_group(redis_backend, GROUP, "c1", {stream: ">"}, count=1)

    [group] = redis_backend.xinfo_groups(stream)
    assert (group["name"], group["consumers"], group["pending"]) == (GROUP, 1, 1)
    assert group["last-delivered-id"] == ids[0]
    info = redis_backend.xinfo_stream(stream)
    assert (info["length"], info["groups"], info["last-generated-id"]) == (2, 1, ids[1])
    assert info["first-entry"][0] == ids[0]
    [consumer] = redis_backend.xinfo_consumers(stream, GROUP)
    assert (consumer["name"], consumer["pending"]) == ("c1", 1)


def test_xtrim_minid_drops_older_entries(redis_backend: RedisClient):
    stream = PARTITION_STREAMS[0]
    for ms in range(1, 6):
        redis_backend.xadd(stream, {"seq": str(ms)}, id=f"{ms}-0")
    assert redis_backend.xtrim(stream, minid="3-0", approximate=False) == 2
    assert [entry_id for entry_id, _ in redis_backend.xrange(stream)] == ["3-0", "4-0", "5-0"]


def test_hset_and_hgetall(redis_backend: RedisClient):
    key = "inventory.owners.{p3}"
    assert redis_backend.hset(key, mapping={"p3": "inventory-1", "epoch": "7"}) == 2
    assert redis_backend.hgetall(key) == {"p3": "inventory-1", "epoch": "7"}


def test_scan_keys_finds_streams_on_every_node(redis_backend: RedisClient):
    streams = [f"{name}.events.{{p{p}}}" for name in ("orders", "billing") for p in range(8)]
    for stream in streams:
        redis_backend.xadd(stream, {"seq": "0"})
    redis_backend.hset("orders.meta.{p0}", "partitions", "8")  # not a stream

    assert scan_keys(redis_backend, "*.events.*", type_="stream") == sorted(streams)
    assert scan_keys(redis_backend, "orders.*") == sorted(
        [s for s in streams if s.startswith("orders.")] + ["orders.meta.{p0}"]
    )
    if is_cluster(redis_backend):
        nodes = {redis_backend.get_node_from_key(stream).name for stream in streams}
        assert len(nodes) == 3  # the keys really were spread over the three masters


def test_flush_empties_every_node(redis_backend: RedisClient):
    for p in range(8):
        redis_backend.xadd(f"x.events.{{p{p}}}", {"seq": "0"})
    flush(redis_backend)
    assert scan_keys(redis_backend, "*") == []
    assert redis_backend.dbsize() == 0  # on a cluster: redis-py sums every primary's reply


def test_an_unreachable_cluster_is_an_outage():
    from devstack.osutil import free_port

    with pytest.raises(REDIS_OUTAGE_ERRORS) as caught:
        connect(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    assert isinstance(caught.value, ClusterUnreachableError)


def test_the_suites_redis_follows_saga_test_redis_cluster(clean_state):
    """With SAGA_TEST_REDIS_CLUSTER=1 the suite's Redis (and what the code under test
    connects to) is the cluster, and rq gets a plain Redis of its own."""
    client = connect(clean_state.redis_url)  # reads REDIS_CLUSTER, as the services do
    assert is_cluster(client) is cluster_tests_enabled() is clean_state.redis_cluster
    assert scan_keys(client, "*") == []  # clean_state emptied every master
    assert clean_state.env["REDIS_CLUSTER"] == ("1" if cluster_tests_enabled() else "0")
    rq_client = connect(clean_state.env["RQ_REDIS_URL"], cluster=False)
    assert rq_client.info("cluster")["cluster_enabled"] == 0


def test_a_cluster_that_goes_away_is_an_outage(tmp_path):
    """Once no node answers, commands and pipelines raise outage errors (redis-py's own
    "cannot be connected" is a bare RedisClusterException; connect() reclassifies it)."""
    from devstack.redis_cluster import EmbeddedRedisCluster

    cluster = EmbeddedRedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        client = connect(cluster.url, cluster=True)
        client.xadd("x.events.{p0}", {"seq": "0"})
    finally:
        cluster.stop()
    with pytest.raises(REDIS_OUTAGE_ERRORS):
        client.xadd("x.events.{p0}", {"seq": "1"})
    pipe = client.pipeline(transaction=False)
    pipe.xadd("x.events.{p0}", {"seq": "1"})
    pipe.xadd("x.events.{p5}", {"seq": "1"})
    with pytest.raises(REDIS_OUTAGE_ERRORS):
        pipe.execute()
    with pytest.raises(REDIS_OUTAGE_ERRORS):
        read_group(client, GROUP, "c1", {"x.events.{p0}": ">"})
