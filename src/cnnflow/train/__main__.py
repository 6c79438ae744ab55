"""The training entrypoint for every launcher.

    # one process
    python -m cnnflow.train --set train.epochs=3
    # N processes on this machine (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=2 -m cnnflow.train
    # elastic: a killed worker restarts the group, which resumes from the last checkpoint
    torchrun --nnodes=1:2 --nproc_per_node=2 --max-restarts=3 \
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29400 -m cnnflow.train
    # torchrun that exits 143 (retryable), not 1, when SIGTERM preempts it
    python -m cnnflow.train.torchrun --nproc_per_node=2 -m cnnflow.train
    # a PyTorchJob pod (the operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK)
    python -m cnnflow.train --params /workspace/params.yaml

Same options as `cnnflow train`: --params FILE, --set section.key=value.
"""

from cnnflow.cli import main_train

if __name__ == "__main__":
    main_train()
