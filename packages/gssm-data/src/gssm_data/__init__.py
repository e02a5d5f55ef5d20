"""Graph-structured sequential models: deterministic datasets and their exact entropy."""
