"""Replicated serving with client-side load balancing: three real server processes on loopback behind one
client (round_robin + retries from the service config). Calls spread over the replicas; one replica drained
with SIGTERM and another killed with SIGKILL in the middle of a bounded load loop cost callers nothing; a shed
call carries the gRPC pushback trailer; health reports NOT_SERVING until warm and while draining."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread, build_tiny_artifact, server_process, server_settings

from bundlerec import BundleRecError, Client, pb
from bundlerec.client import DEFAULT_TIMEOUTS, RetryPolicy, resolve_target, service_config
from bundlerec.errors import from_rpc_error
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server import artifact as A
from bundlerec_server.app import SERVICE_NAME, create_server, server_options
from bundlerec_server.errors import PUSHBACK_KEY, NotReady, Overloaded, to_status
from bundlerec_server.runtime import Runtime
from bundlerec_server.settings import Settings

REPLICAS = 3
THREADS, CALLS_PER_THREAD = 4, 120  # the failover loop: 480 Recommend calls


@pytest.fixture(scope="module")
def replicas(tiny_artifact):
    procs = [server_process(tiny_artifact, "--replica-id", f"r{i}", "--grace-s", "5") for i in range(REPLICAS)]
    try:
        for p in procs:
            p.wait_serving()
        yield procs
    finally:
        for p in procs:
            p.stop()


def replica_of(stream) -> tuple[str, int]:
    """(replica id, earlier gRPC attempts) from a finished stream's trailers."""
    trailers = dict(stream.trailing_metadata())
    return trailers.get("bundlerec-replica", "?"), int(trailers.get("bundlerec-previous-attempts", 0))


# --- the client's target and service config

def test_targets_become_one_balanced_target():
    assert resolve_target("dns:///bundlerec-headless:50051") == "dns:///bundlerec-headless:50051"
    assert resolve_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert resolve_target(["replica-0:50051"]) == "replica-0:50051"
    with pytest.raises(ValueError, match="dns:///"):
        resolve_target(["replica-0:50051", "replica-1:50051"])
    with pytest.raises(ValueError, match="mixes"):
        resolve_target(["127.0.0.1:1", "[::1]:2"])


def test_service_config_balances_retries_and_times_out():
    cfg = service_config()
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    by_method = {m["name"][0]["method"]: m for m in cfg["methodConfig"]}
    assert {m["name"][0]["service"] for m in cfg["methodConfig"]} == {"bundlerec.v1.BundleRecommender"}
    assert {k: v["timeout"] for k, v in by_method.items()} == {"Recommend": "5s", "Search": "5s", "GetInfo": "5s", "RecordEvents": "30s"}
    policy = by_method["Recommend"]["retryPolicy"]
    assert policy == {"maxAttempts": 5, "initialBackoff": "0.02s", "maxBackoff": "0.2s", "backoffMultiplier": 2.0,
                      "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]}
    assert "retryPolicy" not in by_method["RecordEvents"]  # not idempotent: never retried after reaching a server
    json.dumps(cfg)  # what other gRPC clients take
    with Client(["127.0.0.1:1", "127.0.0.1:2"], timeout=0.25, timeouts={"Search": 9}) as c:
        assert c.target == "ipv4:127.0.0.1:1,127.0.0.1:2"
        assert set(c.timeouts.values()) == {0.25}  # a client-wide timeout applies to every method
    with Client("127.0.0.1:1", timeouts={"Search": 0.7}, retry=None) as c:
        assert c.timeouts == {**DEFAULT_TIMEOUTS, "Search": 0.7}
        assert all("retryPolicy" not in m for m in c.service_config["methodConfig"])
    assert service_config(retry=RetryPolicy(max_attempts=3))["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 3


class _Cut(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "Socket closed"

    def trailing_metadata(self):
        return ()


def _bundle(rank: int, *items: str) -> pb.RecommendResponse:
    return pb.RecommendResponse(bundle=pb.Bundle(rank=rank, items=[pb.BundleItem(item_id=i) for i in items]))


_SUMMARY = pb.RecommendResponse(summary=pb.StreamSummary(bundles_sent=3))


class _FakeCall:
    """A Recommend call that sends ``messages`` and then fails with ``error`` (or ends)."""

    def __init__(self, messages, error: grpc.RpcError | None = None) -> None:
        self.messages, self.error, self.cancelled = messages, error, False

    def __iter__(self):
        yield from self.messages
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        for m in iter(self):
            yield m

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _calls(*calls: _FakeCall):
    queue = list(calls)
    return lambda timeout: queue.pop(0)


def test_a_cut_stream_is_reissued_without_repeating_bundles():
    from bundlerec.client import AsyncRecommendStream, RecommendStream

    first = [_bundle(1, "a", "b"), _bundle(2, "c")]
    full = [*first, _bundle(3, "d"), _SUMMARY]
    stream = RecommendStream(_calls(_FakeCall(first, _Cut()), _FakeCall(full)), 3.0, 1)
    assert [b.rank for b in stream] == [1, 2, 3] and stream.summary.bundles_sent == 3
    assert (stream.reissued, stream.skipped) == (1, 2)
    # the re-issued call answers differently (a new artifact): the caller gets the original error, nothing more
    other = [_bundle(1, "a", "x"), _bundle(2, "c"), _bundle(3, "d"), _SUMMARY]
    stream = RecommendStream(_calls(_FakeCall(first, _Cut()), _FakeCall(other)), 3.0, 1)
    got = []
    with pytest.raises(BundleRecError) as info:
        got.extend(b.rank for b in stream)
    assert got == [1, 2] and info.value.code == grpc.StatusCode.UNAVAILABLE
    shorter = RecommendStream(_calls(_FakeCall(first, _Cut()), _FakeCall([first[0], _SUMMARY])), 3.0, 1)
    with pytest.raises(BundleRecError):
        list(shorter)
    # not retryable, no budget, or cancelled by the caller: the error as it came
    for code, budget in ((grpc.StatusCode.INVALID_ARGUMENT, 1), (grpc.StatusCode.UNAVAILABLE, 0)):
        stream = RecommendStream(_calls(_FakeCall(first, _Cut(code)), _FakeCall(full)), 3.0, budget)
        with pytest.raises(BundleRecError) as info:
            list(stream)
        assert info.value.code == code and stream.reissued == 0
    stream = RecommendStream(_calls(_FakeCall(first, _Cut(grpc.StatusCode.CANCELLED)), _FakeCall(full)), 3.0, 1)
    stream.cancel()
    with pytest.raises(BundleRecError):
        list(stream)

    async def consume() -> list[int]:
        s = AsyncRecommendStream(_calls(_FakeCall(first, _Cut()), _FakeCall(full)), 3.0, 1)
        return [b.rank async for b in s]

    assert asyncio.run(consume()) == [1, 2, 3]


# --- the server side: pushback, connection age, health

def test_retryable_errors_carry_the_pushback_trailer():
    assert dict(to_status(Overloaded("busy", 0.25)).trailing_metadata)[PUSHBACK_KEY] == "250"
    assert dict(to_status(NotReady("loading")).trailing_metadata)[PUSHBACK_KEY] == "100"


def test_a_shed_call_carries_pushback_and_the_client_retries_it(tiny_artifact):
    srv = ServerThread(server_settings(tiny_artifact, max_in_flight=1, max_queue=0, queue_target_ms=0)).start()
    try:
        with grpc.insecure_channel(srv.target, options=[("grpc.enable_retries", 0)]) as ch:  # no retries: see the shed
            stub = pb_grpc.BundleRecommenderStub(ch)
            calls = [stub.Search.future(pb.SearchRequest(query="organic", k=10), timeout=10) for _ in range(24)]
            shed = []
            for call in calls:
                try:
                    call.result()
                except grpc.RpcError as err:
                    shed.append(err)
        assert shed and {e.code() for e in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(dict(e.trailing_metadata())[PUSHBACK_KEY] == "50" for e in shed)
        assert {from_rpc_error(e).retry_after_s for e in shed} == {0.05}  # next to RetryInfo
        outcomes: Counter[str] = Counter()
        with Client(srv.target) as c:  # gRPC retries honour the pushback: the same burst succeeds
            def search() -> None:
                try:
                    c.search("organic", 10)
                    outcomes["OK"] += 1
                except BundleRecError as err:
                    outcomes[err.code.name] += 1
            threads = [threading.Thread(target=search) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        print(f"shed burst: {len(shed)}/24 shed without retries; with the client's retries {dict(outcomes)}")
        assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"} and outcomes["OK"] >= 8  # one slot: 5 attempts of one may all find it taken
    finally:
        srv.stop()


def test_max_connection_age_reaches_the_server_options(tiny_artifact):
    options = dict(server_options(Settings.load(["--max-connection-age-s", "2.5", "--max-connection-age-grace-s", "1"])))
    assert options["grpc.max_connection_age_ms"] == 2500 and options["grpc.max_connection_age_grace_ms"] == 1000
    assert dict(server_options(Settings()))["grpc.max_connection_age_ms"] == 300_000  # on by default
    assert "grpc.max_connection_age_ms" not in dict(server_options(Settings(max_connection_age_s=0)))
    with pytest.raises(ValueError, match="max_connection_age"):
        Settings.load(["--max-connection-age-s", "-1"])
    # a real server closing connections after 0.3 s: calls keep succeeding across the reconnections
    srv = ServerThread(server_settings(tiny_artifact, max_connection_age_s=0.3, max_connection_age_grace_s=0.5)).start()
    try:
        with Client(srv.target) as c:
            end, calls = time.monotonic() + 1.5, 0
            while time.monotonic() < end:
                assert len(list(c.recommend("organic", max_bundles=3))) > 0
                calls += 1
        assert calls > 10
    finally:
        srv.stop()


def test_health_reports_not_serving_until_warm_and_while_draining(tiny_artifact):
    """Both the overall service ("") and the service name: NOT_SERVING before the load, SERVING after, and
    NOT_SERVING pushed to watchers (what gRPC health-checking clients and Kubernetes use) at drain."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    names = ("", SERVICE_NAME)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name

    async def scenario() -> None:
        app = await create_server(server_settings(tiny_artifact))
        await app.server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in names:
                assert status((await stub.Check(health_pb2.HealthCheckRequest(service=name))).status) == "NOT_SERVING"
            await app.load()
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in names]
            for name in names:
                assert status((await stub.Check(health_pb2.HealthCheckRequest(service=name))).status) == "SERVING"
            for w in watches:
                assert status((await w.read()).status) == "SERVING"
            stopping = asyncio.create_task(app.stop(grace=1.0))
            for w in watches:
                assert status((await asyncio.wait_for(w.read(), 5)).status) == "NOT_SERVING"
            await stopping

    asyncio.run(scenario())


def test_reload_resolves_a_symlink_once(tiny_artifact, artifact_root, tmp_path, monkeypatch):
    """The deploy switches /artifacts/current while a load reads it: every file still comes from one version."""
    time.sleep(1.1)  # artifact versions carry the build time
    other = build_tiny_artifact(artifact_root, name="tiny-symlink", min_support=3)
    link = tmp_path / "current"
    link.symlink_to(tiny_artifact)
    v1 = json.loads((tiny_artifact / A.MANIFEST).read_text())["artifact_version"]
    read_manifest = A.read_manifest

    def switch_after_the_manifest(root: Path, verify: bool = True):
        manifest = read_manifest(root, verify)
        swap = tmp_path / "current.new"
        swap.symlink_to(other)
        swap.replace(link)  # the deploy's atomic switch, between the manifest and the data files
        return manifest

    monkeypatch.setattr(A, "read_manifest", switch_after_the_manifest)
    rt = Runtime(Settings(artifact=link, provider="cpu", intra_op_threads=1))
    try:
        assert asyncio.run(rt.reload()) is True
        engine = rt.engine()
        assert engine.version == v1 and engine.root == tiny_artifact.resolve()
        assert len(engine.catalog) == json.loads((tiny_artifact / A.MANIFEST).read_text())["item_count"]
    finally:
        rt.pool.shutdown()


# --- three replicas

def test_calls_spread_across_replicas(replicas):
    split: Counter[str] = Counter()
    with Client([p.target for p in replicas]) as c:
        for _ in range(150):
            stream = c.recommend("organic", max_bundles=5)
            assert len(list(stream)) == stream.summary.bundles_sent > 0
            split[replica_of(stream)[0]] += 1
    print(f"split of 150 Recommend calls over {REPLICAS} replicas: {dict(sorted(split.items()))}")
    assert set(split) == {f"r{i}" for i in range(REPLICAS)}
    assert min(split.values()) >= 150 // REPLICAS // 2  # round robin: each replica takes its share


def test_sigterm_and_sigkill_mid_load_cost_callers_nothing(replicas):
    """480 Recommend calls from 4 threads through one client; after 1/4 of them replica r1 gets SIGTERM (it
    drains), after 1/2 replica r2 gets SIGKILL (its streams are cut). Callers see no error: gRPC retries
    attempts that had no response yet on another replica; a stream cut after bundles arrived is re-issued by
    the client, which checks the new stream repeats what the caller already has and skips it."""
    total = THREADS * CALLS_PER_THREAD
    lock = threading.Lock()
    done: list[tuple[str, int, int, int]] = []  # (replica, earlier gRPC attempts, client re-issues, bundles skipped)
    errors: list[str] = []
    duplicates: list[int] = []

    def caller(c: Client) -> None:
        for _ in range(CALLS_PER_THREAD):
            stream = c.recommend("organic", max_bundles=20, timeout=3.0)
            try:
                ranks = [b.rank for b in stream]
            except BundleRecError as err:
                with lock:
                    errors.append(str(err))
                continue
            replica, attempts = replica_of(stream)
            with lock:
                done.append((replica, attempts, stream.reissued, stream.skipped))
                if ranks != list(range(1, len(ranks) + 1)) or len(ranks) != stream.summary.bundles_sent:
                    duplicates.append(len(ranks))

    t0 = time.monotonic()
    with Client([p.target for p in replicas]) as c:
        threads = [threading.Thread(target=caller, args=(c,)) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for fraction, victim, sig in ((0.25, 1, signal.SIGTERM), (0.5, 2, signal.SIGKILL)):
            while len(done) + len(errors) < total * fraction and time.monotonic() - t0 < 60:
                time.sleep(0.002)
            replicas[victim].signal(sig)
        for t in threads:
            t.join(90)
    elapsed = time.monotonic() - t0
    assert replicas[1].proc.wait(30) == 0, replicas[1].log_tail()  # drained and exited cleanly
    assert replicas[2].proc.wait(5) == -signal.SIGKILL
    by_replica = Counter(r for r, *_ in done)
    retried = sum(1 for _, a, _, _ in done if a)
    print(f"failover: {len(done) + len(errors)} calls in {elapsed:.1f}s, {len(errors)} errors, served by "
          f"{dict(sorted(by_replica.items()))}; {retried} calls needed gRPC retries "
          f"({sum(a for _, a, _, _ in done)} extra attempts); {sum(r for _, _, r, _ in done)} client re-issues "
          f"of cut streams ({sum(s for *_, s in done)} repeated bundles skipped)")
    assert errors == []
    assert duplicates == []
    assert len(done) == total
    assert by_replica["r0"] > total / 2  # the survivor took over
