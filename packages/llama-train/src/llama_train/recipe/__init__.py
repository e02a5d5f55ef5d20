"""The training recipe: what a run is and everything that works on one run.

- :mod:`~llama_train.recipe.train_config`: `TrainConfig`, composing the core's sections;
- :mod:`~llama_train.recipe.train`: `train(config)`, one run from start (or resume) to summary;
- :mod:`~llama_train.recipe.train_stack`: several runs of one model shape in one process;
- :mod:`~llama_train.recipe.branches`: cooldown branches forked from a trunk's checkpoints;
- :mod:`~llama_train.recipe.loading`: a trained model from a run directory, unpickling nothing;
- :mod:`~llama_train.recipe.evaluate_run`: a run's model against the exact entropy;
- :mod:`~llama_train.recipe.extrapolate`: a run's model on longer sequences, per rotary scaling;
- :mod:`~llama_train.recipe.generate`: samples from a run, scored by the true process;
- :mod:`~llama_train.recipe.probe`: what the hidden state knows about the latent nodes;
- :mod:`~llama_train.recipe.export`: a run as a Hugging Face model folder.

Below the launchers and the command line, above `core`: nothing here imports
`llama_train.launch` or `llama_train.cli`.
"""
