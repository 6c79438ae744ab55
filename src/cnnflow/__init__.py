"""cnnflow: versioned data, distributed PyTorch training of CNNs, MLflow tracking."""

__version__ = "0.1.0"
