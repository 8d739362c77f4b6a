"""Shared by the ServerApp and the ClientApp: config, datasets, partitions, models, training math."""
