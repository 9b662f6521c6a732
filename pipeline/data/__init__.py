"""The data half: corpus generation, crawling, filtering, and WebDataset shard helpers."""
