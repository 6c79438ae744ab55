"""The training pipeline (defined in `cnnflow.kfp.cnn_training`, re-exported here).

    cnnflow pipeline compile         # -> pipelines/compiled/cnn_training.yaml (committed)
    cnnflow pipeline run             # kfp.local on params.yaml (make run)
    cnnflow pipeline submit --host http://<kfp>:8080
    python pipelines/cnn_training.py [OUT.yaml]    # compile without the CLI
"""

import sys

from cnnflow.kfp.cnn_training import build_pipeline, cnn_training

__all__ = ["build_pipeline", "cnn_training"]

if __name__ == "__main__":
    from cnnflow.pipeline import COMPILED, compile_pipeline

    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else COMPILED))
