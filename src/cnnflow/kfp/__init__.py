"""The Kubeflow Pipelines layer: the training pipeline, its components and their steps.

    from cnnflow.kfp.cnn_training import cnn_training    # the @dsl.pipeline
    from cnnflow.kfp.components import prepare, train    # the @dsl.component shells
    cnnflow pipeline compile | run | submit --host URL    # cnnflow.pipeline, via the CLI

- `params`: every params.yaml key as a pipeline parameter (`prepare.seed` -> `prepare_seed`)
  and the text each component receives them in.
- `components`: one thin component per stage (stdlib + kfp at module level; cnnflow is
  imported inside the body, which calls one `steps` function).
- `steps`: what the components do, as plain functions: enter the workspace (the PVC, or a
  local directory under kfp.local), find the pipeline's MLflow parent run, call the stage
  function of `cnnflow.stages` / `cnnflow.launch`, fill the output artifacts.
- `cnn_training`: the pipeline, its signature generated from `flatten(Params())`.

The code lives in the package (not only under the repository's `components/` and
`pipelines/`, which re-export it) so that an installed cnnflow, e.g. the image, can
compile and submit the pipeline, and the components import what they run from the same
installed package.
"""
