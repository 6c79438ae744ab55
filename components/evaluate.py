"""The KFP component evaluate: test metrics, @challenger, promotion gate (Metrics, Markdown report).

Defined in `cnnflow.kfp.components` (installed with the package, so the image and any
environment with cnnflow can compile the pipeline); re-exported here per the layout.
"""

from cnnflow.kfp.components import evaluate

__all__ = ["evaluate"]
