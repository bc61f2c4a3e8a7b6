#!/usr/bin/env bash
# kfac_ddp under torchrun, one node or several. Run it once on every node (same MASTER_ADDR and
# MASTER_PORT everywhere, NODE_RANK 0..NNODES-1); Lightning detects torchrun and starts nothing
# itself, so trainer.num_nodes and trainer.devices must match --nnodes and --nproc_per_node.
#
#   examples/torchrun.sh                                                   # 1 node, 1 process
#   NPROC_PER_NODE=4 examples/torchrun.sh --trainer.accelerator=gpu        # 1 node, 4 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=4 examples/torchrun.sh   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=4 examples/torchrun.sh   # on node 1
#
# CONFIG picks the Lightning CLI config (default: the digits MLP, CPU); extra arguments go to the
# CLI (e.g. --trainer.max_epochs=10). On CPU nodes gloo must find the interface that reaches the
# other nodes: export GLOO_SOCKET_IFNAME=eth0 (or whatever `ip addr` shows).
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-examples/configs/digits_mlp.yaml}

exec torchrun \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m lightning_kfac fit --config "$CONFIG" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE" "$@"
