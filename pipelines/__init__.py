"""KFP pipelines; their compiled YAML is committed under pipelines/compiled/."""
