#!/usr/bin/env bash
# One learner rank under the deepspeed launcher (see deepspeed_multinode.sh): says which rank runs
# where, so a multi-node log shows the placement, then runs `minillm-rl "$@"` in place.
set -euo pipefail
echo "deepspeed_rank.sh: rank ${RANK:-?} of ${WORLD_SIZE:-?} (local rank ${LOCAL_RANK:-?}, node rank" \
    "${CROSS_RANK:-?}) on host $(hostname) -> master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
exec "${MINILLM_PYTHON:-python3}" -u -m minillm_rl.cli "$@"
