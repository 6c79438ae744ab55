"""One KFP component per stage, each a thin shell calling one `cnnflow.kfp.steps` function.

    from components import prepare, shard, train, evaluate, finish

The definitions live in `cnnflow.kfp.components` (see its docstring); these modules
re-export them so the repository layout shows one module per stage.
"""

from components.evaluate import evaluate
from components.finish import finish
from components.prepare import prepare
from components.shard import shard
from components.train import train

__all__ = ["prepare", "shard", "train", "evaluate", "finish"]
