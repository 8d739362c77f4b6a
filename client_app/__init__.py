"""The Flower ClientApp: one local-batch gradient (or H local steps) per round."""
