# Search at 100 RPS, hybrid, test queries: new code + 28-feature ranker (scores / learned) and the previous code + 24-feature ranker (learned), alternated twice
set -e
cd /work/main
O=runs/search-3
start() { PYTHONPATH=$1/server:$1/export:$1/client:$1 .venv/bin/python -m bundlerec_server --artifact $2 --host 127.0.0.1 --port $3 --fusion $4 > $O/srv-$3.log 2>&1 & echo $!; }
P1=$(start /work/main artifacts/homedepot 50611 scores)
P2=$(start /work/main artifacts/homedepot 50612 learned)
P3=$(start /work/wt/old runs/engage/hd-old 50613 learned)
for p in 50611 50612 50613; do for i in $(seq 1 120); do .venv/bin/python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch=grpc.insecure_channel('127.0.0.1:$p'); r=hg.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=1); sys.exit(0 if r.status==1 else 1)" 2>/dev/null && break; sleep 1; done; done
for round in 1 2; do
  for spec in "new-scores 50611 $P1" "new-learned 50612 $P2" "old-learned 50613 $P3"; do
    set -- $spec
    .venv/bin/python -m benchmarks.load --target 127.0.0.1:$2 --rps 100 --duration 20 --rpc search --mode hybrid --queries runs/hd_test_queries.txt --server-pid $3 --json $O/$1-$round.json 2>&1 | grep -E "achieved" | sed "s/^/$1 /"
  done
done
kill $P1 $P2 $P3
