"""Server-side math and the Flower strategy: aggregation, server optimizer, teachers."""
