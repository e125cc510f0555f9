# Search at 100 RPS, hybrid, Home Depot test queries: the server as it was when issue 15 was filed (1e84140, the commit
# before the learned ranker; its default was the scores fusion) against today's server with the scores fusion and
# with the served learned ranker (ef tuned on dev, compiled trees), and the learned ranker as served before this
# session's changes (ef 256, LightGBM's predictor); same artifact, alternated (ROUNDS, default 2). Needs a worktree of 1e84140 at
# $FILING (git worktree add --detach $FILING 1e84140, stubs generated there, .venv linked).
set -e
cd /work/main
FILING=${FILING:-/work/wt/filing}
O=${O:-runs/search-vs-filing}
mkdir -p $O
start() { PYTHONPATH=$1/server:$1/export:$1/client:$1 .venv/bin/python -m bundlerec_server --artifact artifacts/homedepot --host 127.0.0.1 --port $2 --fusion $3 ${@:4} > $O/srv-$2.log 2>&1 & echo $!; }
P1=$(start $FILING 50621 scores)
P2=$(start /work/main 50622 scores)
P3=$(start /work/main 50623 learned)
P4=$(start /work/main 50624 learned --ef-search 256 --ranker-engine lightgbm)
for p in 50621 50622 50623 50624; do for i in $(seq 1 120); do .venv/bin/python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch=grpc.insecure_channel('127.0.0.1:$p'); r=hg.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=1); sys.exit(0 if r.status==1 else 1)" 2>/dev/null && break; sleep 1; done; done
for round in $(seq 1 ${ROUNDS:-2}); do
  for spec in "filing-scores 50621 $P1" "today-scores 50622 $P2" "today-learned 50623 $P3" "before-learned 50624 $P4"; do
    set -- $spec
    .venv/bin/python -m benchmarks.load --target 127.0.0.1:$2 --rps 100 --duration 20 --rpc search --mode hybrid --queries runs/hd_test_queries.txt --server-pid $3 --json $O/$1-$round.json 2>&1 | grep -E "achieved" | sed "s/^/$1 /"
    uptime
  done
done
kill $P1 $P2 $P3 $P4
