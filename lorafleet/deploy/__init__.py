"""Cluster deployment: KServe objects rendered from the fleet spec, validated and applied."""
