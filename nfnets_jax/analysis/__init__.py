"""Analysis tools that read a model rather than train it (signal-propagation plots, …)."""
