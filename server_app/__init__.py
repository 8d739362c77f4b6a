"""The Flower ServerApp: runs the large-batch strategy, evaluates centrally, writes results."""
