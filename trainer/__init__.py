"""Trainer for the course's CNNs on datasets built by pipelines.build."""
