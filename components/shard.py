"""The KFP component shard: checksummed WebDataset shards (Input/Output[Dataset]).

Defined in `cnnflow.kfp.components` (installed with the package, so the image and any
environment with cnnflow can compile the pipeline); re-exported here per the layout.
"""

from cnnflow.kfp.components import shard

__all__ = ["shard"]
