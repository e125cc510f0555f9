# call_costs alternated: served 6-layer artifact vs the 3-layer student artifact, twice, instacart + Home Depot train queries
set -e
cd /work/wt/small
WT=/work/wt/small
export PYTHONPATH=$WT/server:$WT/export:$WT/client:$WT
for round in 1 2; do
  for a in artifacts/homedepot runs/homedepot-l3; do
    for q in benchmarks/queries/instacart.txt runs/hd_train_queries.txt; do
      echo "== round $round $a $(basename $q) load: $(cut -d' ' -f1-3 /proc/loadavg)"
      .venv/bin/python -m benchmarks.call_costs --artifact $a --queries $q 2>/dev/null
    done
  done
done
echo "end load: $(cut -d' ' -f1-3 /proc/loadavg)"
