# The same 100 RPS comparison as ../rps.sh (one round) with the distilled + fine-tuned 3-layer student
STUDENT=runs/homedepot-l3ft O=runs/rps-l3ft ROUNDS=1 bash "$(dirname "$0")/../rps.sh"
