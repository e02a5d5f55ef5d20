"""The trainer's building blocks: model, optimizer, data, ranks, checkpoints, evaluation,
metrics, profiler, decoding, linear probes.

Nothing here imports the recipe (`llama_train.recipe`), the launchers
(`llama_train.launch`) or the command line (`llama_train.cli`); each module owns its
config section, which the recipe's `TrainConfig` composes.
"""
