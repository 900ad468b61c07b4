"""Pipeline definitions and their compiled IR YAML (the files users upload in the KFP UI)."""
