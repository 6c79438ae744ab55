"""The KFP component finish: the exit handler closing the pipeline's MLflow parent run.

Defined in `cnnflow.kfp.components` (installed with the package, so the image and any
environment with cnnflow can compile the pipeline); re-exported here per the layout.
"""

from cnnflow.kfp.components import finish

__all__ = ["finish"]
