# 100 RPS, one query at a time: the served 6-layer Home Depot artifact vs the 3-layer student's, two servers started
# together and alternated (ROUNDS, default 2); Recommend (5 bundles x 3) and Search (hybrid, served fusion), Home
# Depot train queries. STUDENT (default runs/homedepot-l3) and O name the student artifact and the output folder.
set -e
cd /work/wt/small
WT=/work/wt/small
export PYTHONPATH=$WT/server:$WT/export:$WT/client:$WT
O=${O:-runs/rps-l3}; mkdir -p $O
start() { .venv/bin/python -m bundlerec_server --artifact $1 --host 127.0.0.1 --port $2 > $O/srv-$2.log 2>&1 & echo $!; }
P1=$(start artifacts/homedepot 50711)
P2=$(start ${STUDENT:-runs/homedepot-l3} 50712)
for p in 50711 50712; do for i in $(seq 1 180); do .venv/bin/python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch=grpc.insecure_channel('127.0.0.1:$p'); r=hg.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=1); sys.exit(0 if r.status==1 else 1)" 2>/dev/null && break; sleep 1; done; done
for round in $(seq 1 ${ROUNDS:-2}); do
  for rpc in recommend search; do
    for spec in "l6 50711 $P1" "l3 50712 $P2"; do
      set -- $spec
      extra=""; [ $rpc = search ] && extra="--mode hybrid"
      echo "== $rpc $1 round $round load: $(cut -d' ' -f1-3 /proc/loadavg)"
      .venv/bin/python -m benchmarks.load --target 127.0.0.1:$2 --rps 100 --duration 20 --rpc $rpc $extra --queries runs/hd_train_queries.txt --server-pid $3 --json $O/$rpc-$1-$round.json 2>&1 | tail -4
    done
  done
done
kill $P1 $P2
echo "end load: $(cut -d' ' -f1-3 /proc/loadavg)"
