"""The KFP component train: distributed training as a PyTorchJob (Input[Dataset] -> Output[Model]).

Defined in `cnnflow.kfp.components` (installed with the package, so the image and any
environment with cnnflow can compile the pipeline); re-exported here per the layout.
"""

from cnnflow.kfp.components import train

__all__ = ["train"]
