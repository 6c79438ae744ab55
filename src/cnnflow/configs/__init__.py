"""The per-concern config dataclasses, one module per params.yaml section's owner.

    data        PrepareConfig, ShardConfig (SOURCES)   -> cnnflow.data
    model       ModelConfig                            -> cnnflow.models
    parallel    ParallelConfig                         -> cnnflow.distributed
    optim       OptimConfig                            -> cnnflow.train.loop
    train       TrainConfig                            -> cnnflow.train.trainer
    checkpoint  CheckpointConfig                       -> cnnflow.train.checkpoint
    tracking    TrackingConfig                         -> cnnflow.tracking
    evaluate    EvaluateConfig                         -> cnnflow.evaluate
    launch      LaunchConfig                           -> cnnflow.launch

Import them from `cnnflow.config`, which assembles them into `Params` and loads
params.yaml. They sit here rather than inside their owners because some owners import
torch at package level (`cnnflow.models`) and loading params must stay torch-free: every
module here imports only the stdlib and `cnnflow.errors`, and this file imports nothing.
"""
