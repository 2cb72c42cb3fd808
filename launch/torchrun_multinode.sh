#!/usr/bin/env bash
# Start the torchrun agent for one node of a multi-node xtrain job (c10d rendezvous).
# Run the same command on every node; the nodes meet at HEAD_ADDR:HEAD_PORT
# (any one of them, usually the first) and torchrun numbers the ranks.
#
#   HEAD_ADDR=10.0.0.1 NNODES=2 NPROC_PER_NODE=4 launch/torchrun_multinode.sh strategy=dp
#   launch/torchrun_multinode.sh -a 10.0.0.1 -n 2 -p 4 -- strategy=dp model=small
#
# Options (each falls back to the environment variable in brackets):
#   -a ADDR   rendezvous host, reachable from every node        [HEAD_ADDR, required]
#   -P PORT   rendezvous port on that host                       [HEAD_PORT, 29500]
#   -n N      number of nodes (or MIN:MAX for an elastic range)  [NNODES, 1]
#   -p N      processes per node                                 [NPROC_PER_NODE, GPUs on this node, else 1]
#   -i ID     job id, the same on every node and new per job     [RDZV_ID, xtrain]
# Everything after the options (or after --) goes to `python -m xtrain.train`.
# TORCHRUN picks the torchrun to use (default: torchrun on PATH).
# Pass train.out_dir=... on a filesystem every node shares: rank 0 writes
# the metrics and config there and every rank writes its rank{r}.log.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

head_addr=${HEAD_ADDR:-}
head_port=${HEAD_PORT:-29500}
nnodes=${NNODES:-1}
rdzv_id=${RDZV_ID:-xtrain}
if [[ -n ${NPROC_PER_NODE:-} ]]; then
    nproc=$NPROC_PER_NODE
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L | wc -l)
else
    nproc=1
fi

while getopts "a:P:n:p:i:h" opt; do
    case $opt in
        a) head_addr=$OPTARG ;;
        P) head_port=$OPTARG ;;
        n) nnodes=$OPTARG ;;
        p) nproc=$OPTARG ;;
        i) rdzv_id=$OPTARG ;;
        h) usage 0 ;;
        *) usage 2 >&2 ;;
    esac
done
shift $((OPTIND - 1))

if [[ -z $head_addr ]]; then
    echo "torchrun_multinode.sh: set the rendezvous host with -a ADDR or HEAD_ADDR" >&2
    exit 2
fi

set -x
exec ${TORCHRUN:-torchrun} \
    --nnodes "$nnodes" \
    --nproc-per-node "$nproc" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_addr:$head_port" \
    --rdzv-id "$rdzv_id" \
    -m xtrain.train "$@"
