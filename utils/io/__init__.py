"""Files and output: atomic writes, the run folder, one event path (console, metrics.jsonl, trackers), memory, the perplexity history."""
